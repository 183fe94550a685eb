"""The sampling engine: batching, greedy equality with transformers, sampling filters, chat sessions."""

import math

import pytest
import torch

from prefcli.errors import PrefcliError
from prefcli.generate import ChatSession, Completion, filter_logits, generate, sample_next
from prefcli.model import Transformer, make_config, save_model

VOCAB = 61


def make_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny random model with weights large enough to give varied, peaked next-token choices."""
    kw = dict(dim=32, layers=2, heads=4, kv_heads=2, ffn_dim=64, context=128, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)
    kw.update(overrides)
    model = Transformer(make_config("tiny", VOCAB, **kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=g))
    return model


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_reference(model: Transformer, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache: what the engine must reproduce."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(out[-1])
    return out


# ----------------------------------------------------------------------------- generate

def test_greedy_equals_full_forward_decoding():
    model = make_model()
    p = prompt(5, 1)
    (c,) = generate(model, [p], max_new_tokens=12, temperature=0)
    assert c.tokens == greedy_reference(model, p, 12)
    assert not c.finished and len(c.logprobs) == 12
    assert len(set(c.tokens)) > 3  # a varied continuation, not one repeated token


def test_left_padded_batch_equals_each_prompt_alone():
    model = make_model()
    prompts = [prompt(n, seed=n) for n in (3, 9, 1, 6)]
    batch = generate(model, prompts, max_new_tokens=10, temperature=0)
    for p, c in zip(prompts, batch):
        alone = generate(model, [p], max_new_tokens=10, temperature=0)[0]
        assert c.tokens == alone.tokens
        assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_logprobs_are_raw_model_logprobs_at_temperature_one():
    model = make_model()
    p = prompt(4, 2)
    (c,) = generate(model, [p], max_new_tokens=6, temperature=0.5, top_k=5, seed=3)
    with torch.no_grad():
        logits = model(torch.tensor([p + c.tokens]))[0, len(p) - 1:-1]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
    assert c.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_stop_tokens_finish_rows_and_others_continue():
    model = make_model()
    prompts = [prompt(4, 5), prompt(7, 6)]
    free = generate(model, prompts, max_new_tokens=10, temperature=0)
    stop = free[0].tokens[3]  # row 0 will hit this token at step 4
    first_hit = [next((i for i, t in enumerate(c.tokens) if t == stop), None) for c in free]
    out = generate(model, prompts, max_new_tokens=10, temperature=0, stop_ids=[stop])
    for c, f, hit in zip(out, free, first_hit):
        if hit is None:
            assert c.tokens == f.tokens and not c.finished
        else:
            assert c.tokens == f.tokens[:hit + 1] and c.finished  # stop token included
    assert out[0].finished and len(out[0].tokens) <= 4
    assert generate(model, prompts[:1], max_new_tokens=10, temperature=0, stop_ids=stop)[0].tokens == out[0].tokens


def test_on_token_streams_every_token_in_order():
    model = make_model()
    seen = {0: [], 1: []}
    out = generate(model, [prompt(3, 1), prompt(5, 2)], max_new_tokens=5, temperature=0,
                   on_token=lambda row, tok: seen[row].append(tok))
    assert seen == {0: out[0].tokens, 1: out[1].tokens}


def test_seeded_sampling_repeats_and_varies():
    model = make_model()
    prompts = [prompt(3, 1)] * 4
    a = generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=torch.Generator().manual_seed(7))
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert len({tuple(c.tokens) for c in a}) > 1  # four samples of one prompt differ


def test_top_k_one_is_greedy():
    model = make_model()
    p = [prompt(4, 9)]
    assert generate(model, p, max_new_tokens=8, top_k=1, seed=0)[0].tokens == \
        generate(model, p, max_new_tokens=8, temperature=0)[0].tokens


def test_edge_cases():
    model = make_model()
    assert generate(model, [], max_new_tokens=4) == []
    assert generate(model, [[5]], max_new_tokens=0) == [Completion()]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], max_new_tokens=3)


# ----------------------------------------------------------------------------- sampling math

def test_filter_logits_top_k_then_top_p_by_hand():
    # probabilities 0.5, 0.25, 0.15, 0.1 (logits log p)
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    kept = lambda t: torch.isfinite(t)[0].tolist()
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]  # 0.5 reaches 0.5
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False]  # 0.5 < 0.6 <= 0.75
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, True, False]  # 0.75 < 0.8 <= 0.9
    assert kept(filter_logits(logits, top_p=0.95)) == [True, True, True, True]
    assert kept(filter_logits(logits, top_p=0.0)) == [True, False, False, False]  # the best token always stays
    # top-k first, then top-p on the renormalised rest: 0.5/0.9 + 0.25/0.9 = 0.83 reaches 0.8
    assert kept(filter_logits(logits, top_k=3, top_p=0.8)) == [True, True, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(filter_logits(shuffled, top_p=0.6)) == [False, True, False, True]
    assert torch.equal(filter_logits(logits), logits)


def test_sample_next_respects_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, 0.0).tolist()) == {1}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- transformers

def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = make_model(seed=4)
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [prompt(6, 11), prompt(6, 12)]
    ours = generate(model, prompts, max_new_tokens=15, temperature=0)
    with torch.no_grad():
        ids = torch.tensor(prompts)
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=15,
                             min_new_tokens=15, eos_token_id=None, pad_token_id=0)[:, 6:]
    assert [c.tokens for c in ours] == theirs.tolist()


# ----------------------------------------------------------------------------- chat session

def test_two_turn_session_equals_generate_over_full_history():
    model = make_model(seed=2)
    session = ChatSession(model)
    turn1, turn2 = prompt(6, 21), prompt(4, 22)
    session.append(turn1)
    reply1 = session.sample(7, temperature=0)
    session.append(turn2)
    assert session.length == 6 + 7 + 4
    reply2 = session.sample(7, temperature=0)
    (fresh,) = generate(model, [turn1 + reply1 + turn2], max_new_tokens=7, temperature=0)
    assert reply2 == fresh.tokens
    assert session.tokens == turn1 + reply1 + turn2 + reply2


def test_session_stop_stream_truncate_drop_reset():
    model = make_model(seed=2)
    session = ChatSession(model)
    history = prompt(8, 31)
    session.append(history)
    free = session.sample(6, temperature=0)
    session.truncate(8)  # undo the reply
    streamed = []
    stopped = session.sample(6, temperature=0, stop_ids=[free[2]], on_token=streamed.append)
    assert stopped == free[:free.index(free[2]) + 1] == streamed and session.finished

    # Drop tokens 2..5 of the conversation: the rest continues as if it had never been there.
    session.append(prompt(3, 32))
    kept = session.tokens[:2] + session.tokens[5:]
    session.drop(2, 5)
    assert session.tokens == kept
    assert session.sample(5, temperature=0) == greedy_reference(model, kept, 5)

    session.reset()
    assert session.length == 0
    with pytest.raises(ValueError, match="append a prompt"):
        session.sample(3)


def test_session_stops_at_max_len():
    session = ChatSession(make_model(), max_len=10)
    session.append(prompt(7, 1))
    assert len(session.sample(20, temperature=0)) == 3 and session.length == 10
    with pytest.raises(PrefcliError, match="holds 10"):
        session.append([5])


def test_training_works_after_generate():
    # Tables and weights built while generating (inference mode) must not leak into autograd.
    model = make_model()
    generate(model, [prompt(3, 1)], max_new_tokens=3, temperature=0)
    assert all(block.self_attn.fused is None for block in model.model.layers)
    model(torch.tensor([prompt(8, 2)])).logsumexp(-1).mean().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
