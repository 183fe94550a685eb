"""--lr when not given: the stage's measured rate, scaled down for full fine-tuning of a bigger model."""

from __future__ import annotations

import json

import pytest
import torch

from prefcli import lora
from prefcli.artifacts import LR_MEASURED_UP_TO, default_lr
from prefcli.model import Transformer, make_config


def model_of(params: int) -> torch.nn.Module:
    return torch.nn.Linear(params, 1, bias=False)  # `params` parameters


def test_small_models_and_training_from_scratch_keep_the_stage_rate():
    assert default_lr(5e-4, None) == 5e-4
    assert default_lr(5e-4, model_of(LR_MEASURED_UP_TO)) == 5e-4
    assert default_lr(5e-4, model_of(1_000_000)) == 5e-4


def test_full_fine_tuning_of_a_bigger_model_scales_down_by_its_size():
    assert default_lr(5e-4, model_of(20_000_000)) == pytest.approx(5e-5)
    assert default_lr(2e-4, model_of(134_515_008)) == pytest.approx(2e-4 * 2e6 / 134_515_008)


def test_lora_keeps_the_stage_rate_whatever_the_size():
    model = Transformer(make_config("small", 2048))
    assert sum(p.numel() for p in model.parameters()) > LR_MEASURED_UP_TO
    assert default_lr(5e-4, model) < 5e-4
    lora.add_adapters(model, lora.LoraSpec(rank=4))
    assert default_lr(5e-4, model) == 5e-4


def test_a_stage_trains_a_bigger_model_at_the_scaled_rate_and_a_given_lr_as_given(cli, chat_ws, tmp_path):
    """reward train on a 5M-parameter backbone: the peak lr in metrics.jsonl is 5e-4 x 2M / 5M."""
    from conftest import CHAT_LINES, write_jsonl

    ws, _ = chat_ws
    r = cli("-w", ws, "pretrain", "--size", "small", "--max-steps", "1", "--out", "big", "--context", "32")
    assert r.code == 0, r.stderr
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": "No."} for q, a in CHAT_LINES])
    n = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(ws / "models/big/model.safetensors")).values())
    common = ["--base", "big", "--data", pairs, "--max-steps", "1", "--warmup", "0", "--batch-size", "2", "--val-fraction", "0"]
    for out, extra, want in (("rm-auto", [], 5e-4 * LR_MEASURED_UP_TO / n), ("rm-given", ["--lr", "1e-3"], 1e-3)):
        r = cli("-w", ws, "reward", "train", *common, "--out", out, *extra)
        assert r.code == 0, r.stderr
        first = json.loads((ws / f"runs/{out}/metrics.jsonl").read_text().splitlines()[0])
        assert first["lr"] == pytest.approx(want, rel=1e-3), out
