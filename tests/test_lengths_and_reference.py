"""--max-length / --max-prompt-length (counted truncation) and a reference pass over only the pairs a run uses."""

from __future__ import annotations

import json

from prefcli.data.examples import encode_completion
from prefcli.stages.preference import used_items
from prefcli.tokenizer import Tokenizer


def test_max_prompt_length_keeps_the_end_of_the_prompt(chat_ws):
    ws, _ = chat_ws
    tok = Tokenizer(ws / "tokenizers/default")
    prompt = [{"role": "user", "content": "the cat sat on a mat with the dog " * 3}]
    reply = [{"role": "assistant", "content": "Ben runs the bakery."}]
    full = encode_completion(tok, prompt, reply, 1000)
    cut = encode_completion(tok, prompt, reply, 1000, max_prompt_len=10)
    assert not full.truncated and cut.truncated
    assert cut.prompt_len == 10 and cut.ids == full.ids[full.prompt_len - 10:]
    assert cut.mask == full.mask[full.prompt_len - 10:]  # the reply's loss tokens are all kept
    short = encode_completion(tok, prompt, reply, 1000, max_prompt_len=500)
    assert short.ids == full.ids and not short.truncated


def test_used_items_are_the_batches_a_run_draws():
    from prefcli.distributed import batch_indices

    used = used_items(1900, 4, 8, 1, seed=0)
    assert len(used) == 32
    assert set(used) == {i for s in range(4) for i in batch_indices(s, 0, 8, 1, 1900, seed=0)}
    assert used_items(10, 100, 8, 1, seed=0) == list(range(10))  # many passes: everything


def test_short_dpo_run_scores_only_the_pairs_it_uses(cli, chat_ws, tmp_path):
    from safetensors import safe_open

    from conftest import CHAT_LINES, write_jsonl

    ws, _ = chat_ws
    pairs = write_jsonl(tmp_path / "many.jsonl", [
        {"prompt": f"{q} ({i})", "chosen": a, "rejected": "No."} for i in range(50) for q, a in CHAT_LINES])
    r = cli("-w", ws, "align", "--method", "dpo", "--policy", "base", "--data", pairs, "--max-steps", "2",
            "--batch-size", "4", "--val-fraction", "0", "--max-length", "24", "--max-prompt-length", "12", "--json")
    assert r.code == 0, r.stderr
    with safe_open(str(ws / "runs/dpo/reference_logps.safetensors"), "pt") as f:
        assert f.get_tensor("logps").shape[0] == 2 * 8  # 2 steps x 4 pairs, chosen and rejected: not 200 pairs
    out = r.json()
    assert out["pairs"] == 200 and out["truncated"] > 0
    assert "were truncated to 24 tokens (prompts to 12)" in r.stderr
    assert "reference log-probs" in r.stderr  # the pass shows progress


def test_sft_max_length_counts_truncated_conversations(cli, chat_ws):
    ws, files = chat_ws
    r = cli("-w", ws, "align", "--method", "sft", "--data", files["chats"], "--max-steps", "1", "--batch-size", "4",
            "--val-fraction", "0", "--max-length", "12", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["truncated"] == 4 and "longer than --max-length (12 tokens)" in r.stderr
    r = cli("-w", ws, "align", "--method", "sft", "--data", files["chats"], "--max-prompt-length", "4")
    assert r.code == 2 and "--max-prompt-length: does not apply to --method sft" in r.stderr


def test_reference_log_probs_are_computed_in_the_training_number_format(cli, chat_ws, tmp_path):
    """Under --precision bf16 the policy runs in bf16 autocast, so its reference must too (else
    the log-ratio at step 0 is bf16 rounding, not zero); fp32 training keeps an fp32 reference."""
    import torch
    from safetensors import safe_open

    from conftest import CHAT_LINES, write_jsonl

    ws, _ = chat_ws
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": "No."} for q, a in CHAT_LINES])
    caches = {}
    for precision in ("fp32", "bf16"):
        r = cli("-w", ws, "align", "--method", "dpo", "--policy", "base", "--data", pairs, "--max-steps", "1",
                "--batch-size", "4", "--val-fraction", "0", "--precision", precision, "--out", f"dpo-{precision}")
        assert r.code == 0, r.stderr
        with safe_open(str(ws / f"runs/dpo-{precision}/reference_logps.safetensors"), "pt") as f:
            caches[precision] = f.get_tensor("logps")
    used = ~caches["fp32"].isnan()
    fp32, bf16 = caches["fp32"][used], caches["bf16"][used]
    assert not torch.equal(fp32, bf16)  # computed in bf16, not copied from an fp32 pass
    torch.testing.assert_close(bf16, fp32, atol=0.5, rtol=0.05)  # the same numbers, to bf16's precision
