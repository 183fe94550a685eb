"""`prefcli pretrain` end to end on small data: the model folder, HF compatibility, lineage, options."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefcli.model import load_model

TINY = ["--layers", "2", "--dim", "64", "--heads", "4", "--context", "32", "--batch-size", "8"]


@pytest.fixture
def tokenized(cli, tmp_path, small_corpus):
    ws = tmp_path / "ws"
    assert cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "300").code == 0
    return ws


def test_pretrain_writes_a_model_transformers_loads(cli, tokenized):
    ws = tokenized
    r = cli("-w", ws, "pretrain", *TINY, "--max-steps", "40", "--lr", "1e-2", "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["steps"] == 40 and out["tokens"] == 40 * 8 * 32
    # The model learned something real: far below the best context-free model.
    assert out["val_loss"] < out["unigram_loss"] - 0.5
    folder = ws / "models/base"
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "meta.json"):
        assert (folder / f).is_file(), f
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["kind"] == "model" and meta["chat"] is False
    assert {p["kind"] for p in meta["parents"]} == {"datasets", "tokenizers"}
    assert meta["metrics"]["val_loss"] == pytest.approx(out["val_loss"])
    assert (ws / "runs/base/metrics.jsonl").is_file()

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ours = load_model(folder).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)

    lineage = cli("-w", ws, "ls", "base", "--json").json()["lineage"]
    assert {p["name"] for p in lineage["parents"]} == {"corpus", "default"}


def test_existing_model_and_resume(cli, tokenized):
    ws = tokenized
    assert cli("-w", ws, "pretrain", *TINY, "--max-steps", "6", "--save-every", "3").code == 0
    r = cli("-w", ws, "pretrain", *TINY, "--max-steps", "6")
    assert r.code == 2 and "already exists" in r.stderr
    # --resume of a finished run with more steps continues from its last checkpoint.
    r = cli("-w", ws, "pretrain", *TINY, "--max-steps", "9", "--save-every", "3", "--resume", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["steps"] == 9
    steps = [json.loads(l)["step"] for l in (ws / "runs/base/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 9
    r = cli("-w", ws, "pretrain", *TINY, "--max-steps", "3", "--out", "fresh", "--resume")
    assert r.code == 2 and "no checkpoint" in r.stderr


def test_config_file_and_cli_precedence(cli, tokenized, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('max-steps = 4\nbatch_size = 2\n[pretrain]\nlayers = 1\ndim = 32\nheads = 2\ncontext = 16\n')
    r = cli("-w", tokenized, "pretrain", "--config", cfg, "--max-steps", "3", "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["steps"] == 3 and out["tokens"] == 3 * 2 * 16
    bad = tmp_path / "bad.toml"
    bad.write_text("max_stepz = 3\n")
    r = cli("-w", tokenized, "pretrain", "--config", bad, "--out", "b2")
    assert r.code == 2 and "unknown setting 'max_stepz'" in r.stderr


def test_bad_inputs(cli, tokenized, tmp_path):
    r = cli("-w", tokenized, "pretrain", "--data", "nope")
    assert r.code == 2 and "no dataset named 'nope'" in r.stderr
    r = cli("-w", tokenized, "pretrain", "--size", "huge")
    assert r.code == 2 and "huge" in r.stderr
    assert not (tokenized / "models").exists()


def test_default_length_is_passes_over_the_corpus_capped_by_parameters():
    from prefcli.stages.pretrain import default_steps

    # 5.33 passes over 230,438 tokens at 16 x 128 tokens a step: the demo's 600 steps.
    assert default_steps(230_438, 1_100_000, 16 * 128) == 600
    # A tenth of the corpus gets a tenth of the steps (no 50 passes over a small file).
    assert default_steps(23_044, 1_100_000, 16 * 128) == 60
    # A big corpus stops at 20 tokens per parameter: 22M tokens / 2,048 a step.
    assert default_steps(10**9, 1_100_000, 16 * 128) == 10_743


def test_epochs_and_tokens_set_the_length(cli, tokenized):
    ws = tokenized
    train_tokens = json.loads((ws / "datasets/corpus/meta.json").read_text())["metrics"]["train_tokens"]
    r = cli("-w", ws, "pretrain", *TINY, "--epochs", "0.5", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["steps"] == math.ceil(0.5 * train_tokens / (8 * 32))
    assert r.json()["passes"] == pytest.approx(0.5, abs=8 * 32 / train_tokens + 0.01)
    r = cli("-w", ws, "pretrain", *TINY, "--tokens", "1000", "--out", "b2", "--json")
    assert r.code == 0 and r.json()["steps"] == 4  # ceil(1000 / 256)
