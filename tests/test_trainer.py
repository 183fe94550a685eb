"""The training loop: schedule, weight decay, accumulation, checkpoints, resume, NaN stop, progress."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from prefcli import progress as progress_mod
from prefcli.distributed import batch_indices
from prefcli.errors import PrefcliError
from prefcli.trainer import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    build_optimizer,
    list_checkpoints,
    lr_at,
    resolve_device,
)

sys.path.insert(0, str(Path(__file__).parent))
from train_script import EXAMPLES, TinyLM, lm_loss, make_data  # noqa: E402

SCRIPT = Path(__file__).parent / "train_script.py"
DATA = make_data()


def tiny_trainer(run_dir, *, dropout=0.0, eval_fn=None, loss_fn=lm_loss, **cfg):
    torch.manual_seed(1234)
    model = TinyLM(dropout)
    base = dict(max_steps=6, batch_size=4, lr=1e-2, log_every=1, device="cpu")
    cfg = TrainConfig(**{**base, **cfg})

    def batches(step, micro):
        return DATA[batch_indices(step, micro, cfg.batch_size, cfg.grad_accum, EXAMPLES, seed=7)]

    return Trainer(model, loss_fn, batches, cfg, run_dir, eval_fn=eval_fn)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- schedule and optimizer -----------------------------------------------------------


def test_lr_schedule_warmup_then_cosine_by_hand(tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=1, lr=1.0, warmup=2, min_lr_ratio=0.1)
    # warmup: lr * (step+1)/warmup; then 0.1 + 0.45 * (1 + cos(pi * (step-2)/4))
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1 + 0.45 * (1 - math.sqrt(0.5))]
    assert [lr_at(s, cfg) for s in range(6)] == pytest.approx(expected, abs=1e-12)
    assert lr_at(6, cfg) == pytest.approx(0.1)  # reaches lr * min_lr_ratio at max_steps
    assert expected[3] == pytest.approx(0.868198, abs=1e-6)
    # The trainer really uses it: the logged lr of step k is lr_at(k - 1).
    trainer = tiny_trainer(tmp_path, max_steps=6, lr=1.0, warmup=2, grad_clip=1.0)
    trainer.train()
    assert [m["lr"] for m in read_metrics(tmp_path)] == pytest.approx(expected, abs=1e-12)


def test_weight_decay_only_on_matrices(tmp_path):
    opt = build_optimizer(TinyLM(), TrainConfig(max_steps=1, batch_size=1, weight_decay=0.1), torch.device("cpu"))
    decayed = {p.dim() for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    free = {p.dim() for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == {2} and free == {1}

    # Behaviour: with zero gradients AdamW's update is decay alone, p <- p * (1 - lr * wd).
    def zero_loss(model, batch):
        return sum((p * 0).sum() for p in model.parameters()), {}

    trainer = tiny_trainer(tmp_path, loss_fn=zero_loss, max_steps=1, lr=0.5, weight_decay=0.1, min_lr_ratio=1.0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        factor = 1 - 0.5 * 0.1 if p.dim() >= 2 else 1.0
        assert torch.allclose(p, before[name] * factor, atol=1e-7, rtol=0), name
    assert any(p.dim() >= 2 for p in trainer.model.parameters())
    assert any(p.dim() < 2 for p in trainer.model.parameters())


def test_grad_accumulation_2x4_equals_1x8(tmp_path):
    def first_step(run_dir, batch_size, grad_accum):
        trainer = tiny_trainer(run_dir, max_steps=1, batch_size=batch_size, grad_accum=grad_accum, grad_clip=0)
        grads = {}
        step = trainer.optimizer.step

        def record_then_step(*a, **k):
            grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
            return step(*a, **k)

        trainer.optimizer.step = record_then_step
        summary = trainer.train()
        return summary["train_loss"], grads, summary["tokens"]

    loss_a, grads_a, tokens_a = first_step(tmp_path / "a", 4, 2)
    loss_b, grads_b, tokens_b = first_step(tmp_path / "b", 8, 1)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert tokens_a == tokens_b == 8 * 8
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 12
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=0), name
    assert any(g.abs().max() > 1e-3 for g in grads_a.values())  # real gradients, not zeros


# ---- checkpoints --------------------------------------------------------------------------


def test_checkpoint_rotation_keeps_k_and_ignores_partial_folders(tmp_path):
    tiny_trainer(tmp_path, max_steps=5, save_every=1, keep_checkpoints=2).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000004", "step-000005"]
    # A temp folder left by a kill mid-save, or a folder without state.json, is not a checkpoint.
    (tmp_path / "checkpoints" / ".tmp-step-000006").mkdir()
    (tmp_path / "checkpoints" / "step-000007").mkdir()
    assert list_checkpoints(tmp_path)[-1].name == "step-000005"


def test_checkpoint_files_and_optimizer_state_round_trip(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=3, save_every=3, dropout=0.1)
    trainer.train()
    folder = tmp_path / "checkpoints" / "step-000003"
    assert sorted(os.listdir(folder)) == ["checksums.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    names = [n for n, _ in trainer.model.named_parameters()]
    flat = load_file(folder / "optimizer.safetensors")
    assert set(flat) == {f"{k}.{n}" for k in ("exp_avg", "exp_avg_sq", "step") for n in names}
    assert float(flat["step.head.weight"]) == 3.0
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 3 and state["config"]["max_steps"] == 3 and state["lr_schedule"]["next_lr"] == pytest.approx(1e-3)
    assert set(load_file(folder / "rng.safetensors")) == {"cpu.rank0"}

    # A fresh model and optimizer loaded from the checkpoint hold exactly the same state.
    fresh = tiny_trainer(tmp_path, max_steps=3, dropout=0.1)
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.add_(1.0)
    fresh._load_last()
    by_param = dict(zip(trainer.model.parameters(), names))
    saved = {by_param[p]: s for p, s in trainer.optimizer.state.items()}
    loaded = {dict(zip(fresh.model.parameters(), names))[p]: s for p, s in fresh.optimizer.state.items()}
    assert saved.keys() == loaded.keys() == set(names)
    for name in names:
        assert torch.equal(dict(trainer.model.named_parameters())[name], dict(fresh.model.named_parameters())[name])
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[name][key], loaded[name][key]), (name, key)
    assert fresh.optimizer.param_groups[0]["weight_decay"] == 0.1 and fresh.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PrefcliError) as err:
        tiny_trainer(tmp_path).train(resume=True)
    assert "no checkpoint" in err.value.message and str(tmp_path) in err.value.message
    assert err.value.hint


def test_fresh_start_refuses_to_mix_with_an_earlier_run(tmp_path):
    tiny_trainer(tmp_path, max_steps=2).train()
    with pytest.raises(PrefcliError) as err:
        tiny_trainer(tmp_path, max_steps=2).train()
    assert "--resume" in err.value.hint


def test_resume_in_process_continues_exactly_and_drops_later_metric_lines(tmp_path):
    full = tiny_trainer(tmp_path / "full", max_steps=8, save_every=4, dropout=0.1)
    full.train()
    part = tiny_trainer(tmp_path / "part", max_steps=8, save_every=4, dropout=0.1)
    part.train()
    # Pretend the run died after step 6: the step-8 checkpoint never happened, lines 7..8 remain.
    import shutil

    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-000008")
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "part" / "metrics.jsonl").write_text("\n".join(lines[:6]) + '\n{"step": 7, "lo')  # cut mid-line
    resumed = tiny_trainer(tmp_path / "part", max_steps=8, save_every=4, dropout=0.1)
    summary = resumed.train(resume=True)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    got, want = read_metrics(tmp_path / "part"), read_metrics(tmp_path / "full")
    assert [m["step"] for m in got] == list(range(1, 9))
    assert [m["loss"] for m in got] == [m["loss"] for m in want]
    assert summary["steps"] == 8 and summary["tokens"] == 8 * 4 * 8
    # Resuming a finished run returns its summary and trains nothing.
    again = tiny_trainer(tmp_path / "part", max_steps=8, save_every=4, dropout=0.1).train(resume=True)
    assert again["train_loss"] == summary["train_loss"] and again["steps"] == 8


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    args = ["--steps", "60", "--save-every", "5", "--grad-accum", "2", "--dropout", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    full = subprocess.run([sys.executable, SCRIPT, tmp_path / "full", *args], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, SCRIPT, run, *args, "--sleep", "0.02"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Kill mid-run: a checkpoint exists and metric lines were written after it.
    while not (list_checkpoints(run) and len((run / "metrics.jsonl").read_text().splitlines()) >= 7):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = list_checkpoints(run)
    assert kept and int(kept[-1].name.split("-")[1]) < 60
    assert len((run / "metrics.jsonl").read_text().splitlines()) > int(kept[-1].name.split("-")[1])

    resumed = subprocess.run([sys.executable, SCRIPT, run, *args, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "full" / "checkpoints" / "step-000060" / "model.safetensors")
    b = load_file(run / "checkpoints" / "step-000060" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(run)] == [m["loss"] for m in read_metrics(tmp_path / "full")]


# ---- divergence, eval, metrics -------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = []

    def nan_at_step_5(model, batch):
        loss, metrics = lm_loss(model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 5 else loss), metrics

    trainer = tiny_trainer(tmp_path, loss_fn=nan_at_step_5, max_steps=10, save_every=2)
    with pytest.raises(TrainingDiverged) as err:
        trainer.train()
    assert isinstance(err.value, PrefcliError)
    assert "step 5" in err.value.message and "nan" in err.value.message
    assert "step-000004" in err.value.hint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    # The weights in memory were not stepped with the NaN gradients: they are step 4's.
    saved = load_file(tmp_path / "checkpoints" / "step-000004" / "model.safetensors")
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, saved[name]) and torch.isfinite(p).all()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_eval_runs_in_eval_mode_without_grad_and_is_logged(tmp_path):
    seen = []

    def eval_fn(model):
        seen.append((model.training, torch.is_grad_enabled()))
        loss, _ = lm_loss(model, DATA[:16])
        return {"val_loss": loss.item()}

    summary = tiny_trainer(tmp_path, max_steps=5, eval_every=2, log_every=10, eval_fn=eval_fn).train()
    assert seen == [(False, False)] * 3  # steps 2, 4 and the end
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [2, 4, 5]  # eval steps and the last step are always logged
    assert all("val_loss" in m for m in lines)
    assert set(lines[0]) >= {"step", "loss", "lr", "tokens_per_s", "elapsed", "eta_s", "acc", "grad_norm", "tokens", "val_loss"}
    assert lines[-1]["eta_s"] == 0 and lines[-1]["tokens"] == 5 * 4 * 8
    assert summary["val_loss"] == lines[-1]["val_loss"] and summary["train_loss"] == lines[-1]["loss"]
    assert set(summary) >= {"train_loss", "val_loss", "steps", "tokens", "seconds", "tokens_per_s"}
    assert summary["train_loss"] < read_metrics(tmp_path)[0]["loss"] + 1  # sanity: a number


def test_logged_loss_is_the_mean_over_the_window(tmp_path):
    tiny_trainer(tmp_path / "every", max_steps=4, log_every=1).train()
    tiny_trainer(tmp_path / "pairs", max_steps=4, log_every=2).train()
    every = [m["loss"] for m in read_metrics(tmp_path / "every")]
    pairs = [m["loss"] for m in read_metrics(tmp_path / "pairs")]
    assert pairs == pytest.approx([(every[0] + every[1]) / 2, (every[2] + every[3]) / 2], abs=1e-9)


def test_bad_config_and_device_are_user_errors(tmp_path):
    with pytest.raises(PrefcliError, match="--grad-accum 0"):
        tiny_trainer(tmp_path, grad_accum=0)
    with pytest.raises(PrefcliError, match="--device"):
        resolve_device("toaster")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(PrefcliError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device("auto").type in ("cpu", "mps")


# ---- progress -------------------------------------------------------------------------------


def test_progress_plain_lines_when_not_a_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress_mod.progress(total=4, desc="tokenize", unit="doc", interval=0) as bar:
        for i in range(4):
            bar.set_postfix(loss=f"{i:.1f}")
            bar.update(1)
    text = err.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("tokenize: 0/4 doc (0%)")
    assert lines[-1].startswith("tokenize: 4/4 doc (100%)") and lines[-1].endswith("loss=3.0")
    assert len(lines) == 5  # the start, each update (interval 0); set_postfix adds none; close repeats none


def test_progress_is_silent_on_other_ranks(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("RANK", "1")
    with progress_mod.progress(total=3, desc="train", interval=0) as bar:
        bar.update(3)
        bar.set_postfix(loss="1.0")
    assert err.getvalue() == ""


def test_progress_uses_rich_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress_mod.progress(total=3, desc="train")
    try:
        assert type(bar).__mro__[1].__module__ == "tqdm.rich"
        assert bar._prog.console.stderr  # rich draws on stderr, never stdout
        bar.update(3)
        bar.set_postfix(loss="0.5")
    finally:
        bar.close()
