"""`prefcli align` (sft and the offline preference methods) and `prefcli reward` end to end on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CHAT_LINES
from prefcli.generate import generate
from prefcli.model import load_model
from prefcli.tokenizer import Tokenizer

FAST = ["--batch-size", "4", "--warmup", "0"]


def test_sft_learns_the_replies(cli, chat_ws):
    ws, files = chat_ws
    r = cli("-w", ws, "align", "--method", "sft", "--data", files["chats"], "--max-steps", "60", "--lr", "1e-2",
            "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["method"] == "sft" and out["examples"] == 4 and out["truncated"] == 0
    folder = ws / "models/sft"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["chat"] is True and meta["parents"][0]["name"] == "base"
    # Greedy replies reproduce the training replies: the loss reached the assistant tokens.
    tok, model = Tokenizer(folder), load_model(folder).eval()
    q, a = CHAT_LINES[0]
    done = generate(model, [tok.chat_ids([{"role": "user", "content": q}], add_generation_prompt=True)],
                    max_new_tokens=20, temperature=0, stop_ids=tok.stop_ids())
    assert tok.decode(done[0].tokens) == a


def test_sft_truncation_is_counted_and_warned(cli, chat_ws, tmp_path):
    ws, _ = chat_ws
    long = tmp_path / "long.jsonl"
    rows = [{"prompt": "tell me a story " * 40, "completion": "Once upon a time."}, {"prompt": "hi", "completion": "Hello."}]
    long.write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = cli("-w", ws, "align", "--method", "sft", "--data", long, "--max-steps", "1", "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["truncated"] == 1
    assert "1 of 2 conversations are longer than the context" in r.stderr


@pytest.mark.parametrize("pack", [True, False])
def test_sft_counts_every_token_when_the_pad_id_is_a_real_token(cli, chat_ws, tmp_path, pack):
    # SmolLM2 pads with <|im_end|>, which also ends every turn: those tokens count as trained on.
    import shutil

    ws, files = chat_ws
    policy = tmp_path / "pads-with-end"
    shutil.copytree(ws / "models/base", policy)
    (policy / "meta.json").unlink()  # a plain HF folder, edited below
    config = json.loads((policy / "tokenizer_config.json").read_text())
    end = Tokenizer(policy).token_id("<|end|>")
    (policy / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|end|>"}))
    tok = Tokenizer(policy)
    assert tok.pad_id == end
    r = cli("-w", ws, "align", "--method", "sft", "--policy", policy, "--data", files["chats"], "--max-steps", "1",
            "--val-fraction", "0", "--pack" if pack else "--no-pack", *FAST, "--json")
    assert r.code == 0, r.stderr
    lines = [json.loads(x) for x in (ws / "runs/sft/metrics.jsonl").read_text().splitlines()]
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHAT_LINES]
    ids = [tok.chat_ids_with_mask(c["messages"])[0] for c in chats]
    assert sum(i.count(end) for i in ids) > 0
    assert lines[-1]["tokens"] == sum(len(i) for i in ids)  # one step over all four chats


def test_dpo_without_heldout_pairs_loads_the_policy_once(cli, chat_ws, monkeypatch):
    # The starting weights are reloaded only to score held-out pairs; a run without any skips it.
    from prefcli.stages import preference

    loads = []
    real = preference.load_model_artifact
    monkeypatch.setattr(preference, "load_model_artifact", lambda *a, **k: loads.append(a[1]) or real(*a, **k))
    ws, files = chat_ws
    r = cli("-w", ws, "align", "--method", "dpo", "--policy", "base", "--data", files["pairs"], "--max-steps", "1",
            "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr
    assert loads == ["base"] and r.json()["heldout_pairs"] == 0


@pytest.mark.parametrize("method", ["dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto"])
def test_every_preference_method_trains(cli, chat_ws, method):
    ws, files = chat_ws
    data = files["kto"] if method == "kto" else files["pairs"]
    r = cli("-w", ws, "align", "--method", method, "--policy", "base", "--data", data, "--max-steps", "2",
            "--val-fraction", "0.25", *FAST, "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["method"] == method and out["model"] == method
    meta = json.loads((ws / f"models/{method}/meta.json").read_text())
    assert meta["stage"] == f"align {method}" and meta["chat"] is True
    reference_cache = ws / f"runs/{method}/reference_logps.safetensors"
    assert reference_cache.is_file() == (method not in ("simpo", "orpo"))


def test_dpo_learns_the_preference_and_reuses_reference_logps(cli, chat_ws):
    ws, files = chat_ws
    r = cli("-w", ws, "align", "--method", "dpo", "--policy", "base", "--data", files["pairs"], "--max-steps", "25",
            "--lr", "5e-3", "--beta", "0.5", "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr
    # The implicit reward now prefers every chosen reply it trained on.
    from prefcli.inference import sequence_logps
    from prefcli.stages.preference import Item, pair_accuracy
    from prefcli.data.examples import encode_completion

    tok = Tokenizer(ws / "models/dpo")
    policy, start = load_model(ws / "models/dpo").eval(), load_model(ws / "models/base").eval()
    items = [Item(encode_completion(tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": a}], 64),
                  encode_completion(tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": "No. Go away, " + a.lower()}], 64))
             for q, a in CHAT_LINES]
    assert pair_accuracy(policy, start, items, tok.pad_id, 8, "cpu", True) == 1.0
    cached = ws / "runs/dpo/reference_logps.safetensors"
    from safetensors.torch import load_file

    ref = load_file(cached)["logps"]
    lp, _ = sequence_logps(start, [e for it in items for e in (it.chosen, it.rejected)], tok.pad_id, 8, "cpu")
    assert torch.allclose(ref, lp, atol=1e-5)  # the cache holds the reference's own log-probs


def test_options_that_do_not_apply_are_refused(cli, chat_ws):
    ws, files = chat_ws
    r = cli("-w", ws, "align", "--method", "sft", "--beta", "0.1")
    assert r.code == 2 and "--beta: does not apply to --method sft" in r.stderr
    r = cli("-w", ws, "align", "--method", "ipo", "--policy", "base", "--data", files["pairs"], "--label-smoothing", "0.1")
    assert r.code == 2 and "--label-smoothing" in r.stderr
    r = cli("-w", ws, "align", "--method", "nope")
    assert r.code == 2 and "unknown method" in r.stderr
    r = cli("-w", ws, "align", "--method", "dpo", "--policy", "base", "--data", files["chats"])
    assert r.code == 2 and "needs 'chosen' and 'rejected'" in r.stderr
    assert not (ws / "models/dpo").exists() and not (ws / "models/ipo").exists()


def test_reward_model_trains_and_transformers_scores_the_same(cli, chat_ws):
    ws, files = chat_ws
    r = cli("-w", ws, "reward", "train", "--base", "base", "--data", files["pairs"], "--max-steps", "30", "--lr", "5e-3",
            "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr
    folder = ws / "models/rm"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["kind"] == "reward_model"
    # Trained on 4 pairs for 30 steps: it ranks all of them right.
    r = cli("-w", ws, "reward", "score", "--input", files["pairs"], "--json")
    assert r.code == 0, r.stderr
    assert r.json()["accuracy"] == 1.0
    one = cli("-w", ws, "reward", "score", "--prompt", CHAT_LINES[0][0], "--response", CHAT_LINES[0][1])
    assert one.code == 0
    ours = float(one.stdout)

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tok = Tokenizer(folder)
    ids = tok.chat_ids([{"role": "user", "content": CHAT_LINES[0][0]}, {"role": "assistant", "content": CHAT_LINES[0][1]}])
    with torch.no_grad():
        theirs = float(hf(torch.tensor([ids])).logits[0, 0])
    assert theirs == pytest.approx(ours, abs=1e-4)


def test_reward_length_groups_give_the_scores_and_gradients_of_one_pass():
    from prefcli.model import Transformer, make_config
    from prefcli.inference import last_token_scores

    torch.manual_seed(0)
    model = Transformer(make_config("tiny", 64), score_head=True)
    model.lm_head = None
    lengths = [3, 11, 5, 20, 7, 2, 16, 9]  # right-padded rows of very different lengths
    ids = torch.zeros((len(lengths), 24), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 64, (n,))
        attn[i, :n] = 1
    results = []
    for groups in (1, 3):
        model.zero_grad()
        scores = last_token_scores(model, ids, attn, groups)
        (scores * torch.arange(1.0, 9.0)).sum().backward()  # a different weight per row: order matters
        results.append((scores.detach(), model.model.embed_tokens.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-5)
    # and they are the model's own last-token scores
    torch.testing.assert_close(results[0][0], model.sequence_scores(ids, attention_mask=attn).float(), atol=1e-5, rtol=1e-5)


def test_length_groups_give_the_sequence_logprobs_of_one_pass():
    from prefcli.model import Transformer, make_config
    from prefcli.objectives.lm import sequence_logprobs
    from prefcli.inference import in_length_groups

    torch.manual_seed(1)
    model = Transformer(make_config("tiny", 64))
    lengths = [4, 19, 6, 12, 2, 9]
    ids = torch.zeros((len(lengths), 20), dtype=torch.long)
    attn, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 64, (n,))
        attn[i, :n] = 1
        loss_mask[i, n // 2:n] = 1  # the reply: the second half

    def logps(rows, width):
        x = ids[rows, :width]
        return sequence_logprobs(model(x, attention_mask=attn[rows, :width]), x, loss_mask[rows, :width])

    (lp1, n1), (lp3, n3) = in_length_groups(logps, attn, 1), in_length_groups(logps, attn, 3)
    torch.testing.assert_close(lp3, lp1, atol=1e-5, rtol=1e-5)
    assert n3.tolist() == n1.tolist() == [n - n // 2 for n in lengths]  # the reply tokens of each row
