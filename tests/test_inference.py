"""prefcli.inference: the shared model x data operations agree with one plain pass per sequence."""

from __future__ import annotations

import pytest
import torch

from prefcli import inference
from prefcli.data.examples import Encoded, pad_batch
from prefcli.data.sources import split_val
from prefcli.generate import generate
from prefcli.model import Transformer, make_config
from prefcli.objectives.lm import sequence_logprobs


def tiny(seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(make_config("tiny", 64, layers=1, dim=32, heads=2, context=32), **kw).eval()


def sequences(n: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 64, (int(k),), generator=g).tolist() for k in torch.randint(2, 20, (n,), generator=g)]


def test_token_logps_in_sorted_batches_equal_one_pass_per_sequence():
    model, seqs = tiny(1), sequences()
    batched = inference.token_logps(model, seqs, batch_size=3)
    with torch.no_grad():
        for s, lp in zip(seqs, batched):
            logp = torch.log_softmax(model(torch.tensor([s]))[0].float(), -1)
            alone = torch.tensor([logp[t - 1, s[t]] for t in range(1, len(s))])
            torch.testing.assert_close(lp, alone, atol=1e-5, rtol=1e-5)
    starts = [len(s) // 2 for s in seqs]
    forced = inference.teacher_forced_logprobs(model, seqs, starts, batch_size=2)
    assert [len(f) for f in forced] == [len(s) - st for s, st in zip(seqs, starts)]
    assert forced[0] == batched[0][starts[0] - 1:].tolist()


def test_sequence_logps_sum_the_masked_tokens_like_the_loss_does():
    model, seqs = tiny(2), sequences()
    encs = [Encoded(s, [0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2)) for s in seqs]
    lp, n = inference.sequence_logps(model, encs, pad_id=0, batch_size=4)
    b = pad_batch(encs, 0)
    with torch.no_grad():
        ref_lp, ref_n = sequence_logprobs(model(b["input_ids"], attention_mask=b["attention_mask"]), b["input_ids"], b["loss_mask"])
    torch.testing.assert_close(lp, ref_lp, atol=1e-4, rtol=1e-5)
    assert n.tolist() == ref_n.tolist() == [len(s) - len(s) // 2 for s in seqs]


def test_encoded_scores_are_each_rows_last_token_score():
    rm = tiny(3, lm_head=False, score_head=True)
    seqs = sequences(5)
    seqs.append(list(seqs[1]))  # a repeat gets exactly the same score
    scores = inference.encoded_scores(rm, seqs, pad_id=0, batch_size=2)
    with torch.no_grad():
        alone = [float(rm.sequence_scores(torch.tensor([s]))[0]) for s in seqs]
    assert scores[1] == scores[-1]
    assert scores == pytest.approx(alone, abs=1e-5)
    # the training path (a SequenceScores module, in length groups) gives the same numbers
    b = pad_batch([Encoded(s, [1] * len(s)) for s in seqs], 0)
    grouped = inference.last_token_scores(inference.SequenceScores(rm), b["input_ids"], b["attention_mask"], 3)
    torch.testing.assert_close(grouped.detach(), torch.tensor(alone), atol=1e-5, rtol=1e-5)


class _Tok:
    """Just what sample_ids needs from a tokenizer."""

    pad_id = 0

    def stop_ids(self, chat=True):
        return [5]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_sample_ids_draws_what_generate_draws_whatever_the_batch_size():
    model, tok = tiny(4), _Tok()
    prompts = [[1, 2, 3], [4], [7, 8]]
    flat = [p for p in prompts for _ in range(3)]
    expected = generate(model, flat, max_new_tokens=6, temperature=1.0, stop_ids=[5], seed=11)
    for batch_size in (9, 64):
        got = inference.sample_ids(model, tok, prompts, samples=3, max_tokens=6, seed=11, batch_size=batch_size)
        assert [g["tokens"] for g in got] == [c.tokens for c in expected]
        assert [g["prompt_ids"] for g in got] == flat
        for g in got:
            assert g["length"] == len(g["tokens"]) - g["finished"]
            assert g["text"] == " ".join(map(str, g["tokens"][:g["length"]]))


def test_split_val_is_seeded_and_keeps_one_for_training():
    train, val = split_val(list(range(20)), 0.25, seed=1)
    assert len(val) == 5 and sorted(train + val) == list(range(20))
    assert split_val(list(range(20)), 0.25, seed=1) == (train, val)
    assert split_val([1, 2], 0.9, seed=0)[0] != [] and split_val([1], 0.5, seed=0) == ([1], [])
