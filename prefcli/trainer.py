"""The one training loop every stage uses.

A stage hands the Trainer three things:

    loss_fn(model, batch) -> (loss, metrics)
        `loss` is a scalar tensor, the mean loss of the micro-batch. `metrics` is a
        dict of floats or scalar tensors to log (averaged over the micro-batches of a
        step and over ranks); the key "tokens" is special: the number of tokens in
        the micro-batch, summed (not averaged) for throughput. `model` is the model
        as trained (DDP-wrapped and/or compiled), so call it, `model(...)`; reach for
        attributes through `unwrap(model)`. A key missing from some micro-batches or ranks
        is averaged over those that have it.

    batches(step, micro) -> batch
        The micro-batch `micro` (0 <= micro < grad_accum) of optimizer step `step`
        (0-based: the number of steps done before it). It must be a pure function of
        (step, micro) and of the rank, so resuming from a checkpoint at step N just
        continues with batches(N, 0): the data position *is* the step. Under torchrun
        each rank must return its own share of the global batch:
        `prefcli.distributed.batch_indices(step, micro, batch_size, grad_accum, n)`
        gives this rank's example indices for you.

    eval_fn(model) -> {"val_loss": ...}   (optional)
        Run every `eval_every` steps and at the end, under torch.no_grad, with the
        model in eval mode. It gets the bare model (not DDP/compiled). It runs on
        every rank (under FSDP the forward needs them all); results are averaged
        over ranks, so either evaluate everything on each rank or shard and let the
        mean combine equal shards.

Global batch = batch_size * grad_accum * world_size examples per optimizer step.

After train(), `full_model()` is the trained module whole on every rank (under FSDP gathered
from the shards into a plain copy): what a stage saves, evaluates and samples from.

Files in run_dir:
    metrics.jsonl                one JSON line per logged step
    checkpoints/step-NNNNNN/     model.safetensors, optimizer.safetensors,
                                 rng.safetensors, state.json
Checkpoints are written to a hidden temp folder and renamed into place, so a
checkpoint folder exists whole or not at all. Only safetensors and JSON: no pickle.

(Over 400 lines on purpose: the loop, its safetensors checkpoints with checksums and exact resume
are one mechanism.)
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from prefcli import distributed as dist
from prefcli.errors import PrefcliError, RuntimeFailure
from prefcli.progress import progress

CHECKSUMS = "checksums.json"  # in a checkpoint: sha256 of each of its files
# TrainConfig fields a resumed run may change (README "Resume"); the rest must match the checkpoint.
RESUME_MAY_CHANGE = ("max_steps", "eval_every", "save_every", "keep_checkpoints", "log_every", "device", "compile", "fsdp")
# Where the loop is, for the one line Ctrl-C prints: {"run_dir": Path, "step": steps done}.
position: dict = {}


class TrainingDiverged(RuntimeFailure):
    """The loss or the gradient norm became NaN or infinite (a runtime failure: exit 1)."""


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int  # examples per micro-batch, per rank
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 0  # linear warmup steps
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False
    precision: str = "auto"  # auto: bf16 autocast on CUDA only; bf16: on any device; fp32: never
    report_to: tuple = ()  # trackers mirroring metrics.jsonl (prefcli.tracking): "tensorboard", "wandb"


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" is CUDA, then MPS, then CPU. Under torchrun, CUDA means this rank's GPU
    (LOCAL_RANK); "auto" picks CUDA only when this rank has a GPU of its own."""
    if name == "auto":
        if torch.cuda.is_available() and dist.local_rank() < torch.cuda.device_count():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PrefcliError(f"--device {name}: not a device", "use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrefcliError(f"--device {name}: CUDA is not available here", "use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PrefcliError(f"--device {name}: MPS is not available here", "use --device cpu or auto")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there a bf16 matmul runs
    4-5x an fp32 one (measured on the 2-core AMD EPYC dev machine); elsewhere bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: no cheap way to ask, so no
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_autocast(precision: str, device: torch.device):
    """The number format of training as a context: bf16 autocast (`bf16`, or `auto` on CUDA) or none.
    Passes whose numbers meet the trained model's, like DPO's reference log-probs, run in it too."""
    if precision not in ("auto", "fp32", "bf16"):
        raise PrefcliError(f"--precision {precision}: unknown", "choose auto, fp32 or bf16")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based step `step`: linear warmup over `warmup` steps
    (lr * (step+1)/warmup), then a cosine from lr down to lr * min_lr_ratio, reached
    at step max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress_ = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0))) * (cfg.lr - min_lr)


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps that cover `epochs` passes over `num_examples` at this world size."""
    per_step = batch_size * grad_accum * dist.world_size()
    return max(1, math.ceil(epochs * num_examples / per_step))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (dim >= 2); biases, norms and other
    vectors are not decayed. The fused kernel on CPU too: 5.9x faster than foreach over
    SmolLM2-135M's parameters on 2 cores (0.056 s vs 0.33 s a step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type in ("cuda", "cpu"))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in run_dir, oldest first (temp folders are skipped)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


# ---- state <-> safetensors --------------------------------------------------------------

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0's CPU
_LOAD = StateDictOptions(full_state_dict=True)  # every rank reads the full tensors, keeps its shard


def _saveable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (tied weights), as safetensors wants."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        if v.data_ptr() in seen and v.numel():
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    return out


def _flatten_optimizer(osd: dict) -> dict[str, torch.Tensor]:
    """{"state": {name: {"exp_avg": t, ...}}} -> {"exp_avg.<name>": t, ...}"""
    flat = {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            flat[f"{key}.{name}"] = torch.as_tensor(value)
    return flat


def _unflatten_optimizer(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        kind, name = key.split(".", 1)
        state.setdefault(name, {})[kind] = value
    return state


def _python_rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


# ---- the loop ---------------------------------------------------------------------------


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        batches: Callable[[int, int], object],
        cfg: TrainConfig,
        run_dir: Path,
        *,
        eval_fn: Callable | None = None,
        desc: str = "train",
    ):
        for option, value in (("--max-steps", cfg.max_steps), ("--batch-size", cfg.batch_size), ("--grad-accum", cfg.grad_accum)):
            if value < 1:
                raise PrefcliError(f"{option} {value}: must be at least 1")
        self.cfg, self.loss_fn, self.batches, self.eval_fn, self.desc = cfg, loss_fn, batches, eval_fn, desc
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.device)
        dist.init_distributed(self.device)
        self.model = model.to(self.device)  # the bare module: what gets saved and evaluated
        self.ddp = None
        self.fsdp = cfg.fsdp and dist.world_size() > 1
        trained: nn.Module = self.model
        self._whole: nn.Module | None = None  # under FSDP: a plain copy that full_model() fills
        if self.fsdp:
            self._whole = _weightless_copy(self.model)
            _fully_shard(self.model, self.device)
        elif dist.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = trained = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.trained = torch.compile(trained) if cfg.compile else trained
        training_autocast(cfg.precision, self.device)  # refuses an unknown --precision now
        self.reporters = []  # opened when training starts (prefcli.tracking)
        self.autocast = lambda: training_autocast(cfg.precision, self.device)

    def full_model(self) -> nn.Module:
        """The trained module whole, as a plain module on every rank: the bare model, or under
        FSDP a copy filled with the full weights gathered from every rank's shard (the same
        copy each call, refreshed). Under FSDP it is a collective: every rank must call it.

        Use it for anything that is not the training forward pass: sampling (online RL's
        rollouts), evaluation after training, saving. Calling the sharded module's parts
        directly (generate, a head) would meet sharded weights, and a forward pass that not
        every rank makes would wait forever for the others.
        """
        if self._whole is None:
            return self.model
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        whole = self._whole
        _materialize(whole, self.device)
        missing, unexpected = whole.load_state_dict(full, strict=False)
        tied = {n for n, _ in whole.named_parameters(remove_duplicate=False)} - {n for n, _ in whole.named_parameters()}
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"full_model: state dict mismatch (missing {missing}, unexpected {unexpected})")
        whole.train(self.model.training)
        return whole

    # -- one optimizer step ---------------------------------------------------------------

    def _step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, tokens, sums = [], [], {}
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            # Sync gradients across ranks only on the last micro-batch.
            sync = contextlib.nullcontext()
            if self.ddp is not None and not last:
                sync = self.ddp.no_sync()
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with self.autocast():
                    loss, metrics = self.loss_fn(self.trained, self.batches(step, micro))
                (loss / cfg.grad_accum).backward()
            losses.append(loss.detach().float())
            for key, value in metrics.items():
                value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
                (tokens if key == "tokens" else sums.setdefault(key, [])).append(value)
        # With clipping off (grad_clip 0) the norm is still measured, for the log and the NaN check.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
        # One vector, one all-reduce, one device sync per step. (The norm is already global.)
        keys = sorted(sums)
        if dist.world_size() > 1:  # the keys any rank logged: kto's micro-batches may lack a group and its keys
            keys = sorted({k for b in dist.all_gather_bytes(json.dumps(keys).encode()) for k in json.loads(b)})
        zero, one = torch.zeros((), device=self.device), torch.ones((), device=self.device)
        local = [torch.stack(losses).mean(), torch.stack(tokens).sum() if tokens else zero, norm.float()]
        for k in keys:  # (this rank's mean, 1), or (0, 0) when it has none: the mean over the ranks that have it
            local += [torch.stack(sums[k]).mean(), one] if k in sums else [zero, zero]
        values = dist.all_reduce_mean(torch.stack(local)).tolist()
        out = {"loss": values[0], "tokens": values[1] * dist.world_size(), "lr": lr, "grad_norm": values[2]}
        out.update((k, values[3 + 2 * i] / values[4 + 2 * i]) for i, k in enumerate(keys))
        for name in ("loss", "grad_norm"):
            if not math.isfinite(out[name]):
                kept = list_checkpoints(self.run_dir)
                where = f"the last good checkpoint, {kept[-1].name}, is kept" if kept else "no checkpoint was written"
                raise TrainingDiverged(
                    f"training diverged: {name} is {out[name]} at step {step + 1} of {self.run_dir}",
                    f"{where}; lower --lr, raise --warmup or check the data",
                )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.eval_fn(self.model)
        self.model.train()
        keys = sorted(metrics)
        if not keys:
            return {}
        values = dist.all_reduce_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, values.tolist()))

    # -- the loop -------------------------------------------------------------------------

    def train(self, resume: bool = False) -> dict:
        """Train to cfg.max_steps (continuing from the last checkpoint when `resume`) and
        return the final metrics: train_loss, val_loss (with an eval_fn), steps, tokens,
        seconds, tokens_per_s."""
        cfg = self.cfg
        self.model.train()
        if resume:
            state = self._load_last()
        else:
            state = self._fresh_start()
        start = state["step"]
        if start >= cfg.max_steps:
            return state["summary"]
        tokens, seconds, window = state["tokens"], state["seconds"], state["window"]
        summary = state["summary"]
        clock = time.perf_counter() - seconds  # seconds since the run began, across resumes
        if cfg.report_to and dist.is_main():
            from prefcli.tracking import open_reporters

            self.reporters = open_reporters(list(cfg.report_to), self.run_dir, asdict(cfg))
        with progress(cfg.max_steps, self.desc, unit="step", initial=start) as bar:
            for step in range(start, cfg.max_steps):
                position.update(run_dir=self.run_dir, step=step)
                out = self._step(step)
                done = step + 1
                tokens += out["tokens"]
                seconds = time.perf_counter() - clock
                _accumulate(window, out)
                evaluated = {}
                last = done == cfg.max_steps
                if self.eval_fn is not None and (last or (cfg.eval_every and done % cfg.eval_every == 0)):
                    evaluated = self._evaluate()
                if last or done % max(1, cfg.log_every) == 0 or evaluated:
                    line = _window_means(window, done, seconds, cfg.max_steps, out["lr"])
                    line.update(tokens=tokens, **evaluated)
                    self._log(line)
                    summary = {**summary, "train_loss": line["loss"], **evaluated}
                    bar.set_postfix(loss=f"{line['loss']:.4f}", lr=f"{out['lr']:.2e}", tok_s=_si(line["tokens_per_s"]))
                    window = _empty_window(time.perf_counter() - clock)  # eval time is not training time
                summary.update(steps=done, tokens=tokens, seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9))
                position.update(step=done)
                if last or (cfg.save_every and done % cfg.save_every == 0):
                    self._save(done, tokens=tokens, seconds=seconds, window=window, summary=summary)
                bar.update(1)
        position.clear()
        return summary

    def _fresh_start(self) -> dict:
        if list_checkpoints(self.run_dir):
            raise PrefcliError(
                f"{self.run_dir / 'checkpoints'} already holds checkpoints of an earlier run",
                "pass --resume to continue it, or --overwrite to start again",
            )
        dist.barrier()  # every rank has looked before rank 0 writes
        seed = self.cfg.seed + dist.rank()
        random.seed(seed)
        torch.manual_seed(seed)  # CPU and every CUDA device
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").write_text("")
        dist.barrier()
        return {"step": 0, "tokens": 0.0, "seconds": 0.0, "window": _empty_window(0.0), "summary": {}}

    def _log(self, line: dict) -> None:
        if dist.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            for report in self.reporters:
                report(line)

    # -- checkpoints ----------------------------------------------------------------------

    def _save(self, step: int, **progress_state) -> None:
        # Collectives first, on every rank: FSDP gathers full tensors, RNG states travel to rank 0.
        model_sd = get_model_state_dict(self.model, options=_FULL)
        optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL)
        rngs = dist.all_gather_bytes(json.dumps(_rng_state(self.device)).encode())
        if dist.is_main():
            folder = self.run_dir / "checkpoints"
            final = folder / f"step-{step:06d}"
            tmp = folder / f".tmp-step-{step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                self._write_checkpoint(tmp, step, model_sd, optim_sd, rngs, progress_state)
            except BaseException as e:  # a full disk, Ctrl-C: no half-written checkpoint stays
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, OSError):
                    kept = list_checkpoints(self.run_dir)
                    where = f"the checkpoint at {kept[-1].name} is kept" if kept else "no checkpoint was written"
                    raise RuntimeFailure(
                        f"cannot write checkpoint {final} ({e.strerror or e})",
                        f"{where}; free some disk space, then continue with --resume" if kept else
                        f"{where}; free some disk space and run again",
                    ) from None
                raise
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[: -max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old)
        dist.barrier()

    def _write_checkpoint(self, tmp: Path, step: int, model_sd, optim_sd, rngs, progress_state) -> None:
        """model, optimizer and RNG state as safetensors, state.json, and checksums.json last."""
        save_file(_saveable(model_sd), tmp / "model.safetensors")
        save_file(_saveable(_flatten_optimizer(optim_sd)), tmp / "optimizer.safetensors")
        per_rank = [json.loads(r) for r in rngs]
        rng_tensors = {}
        for r, rng in enumerate(per_rank):
            for key, values in rng.pop("torch").items():
                rng_tensors[f"{key}.rank{r}"] = torch.tensor(values, dtype=torch.uint8)
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {
            "step": step,
            "lr_schedule": {"next_lr": lr_at(step, self.cfg), "warmup": self.cfg.warmup, "max_steps": self.cfg.max_steps, "min_lr_ratio": self.cfg.min_lr_ratio},
            "config": asdict(self.cfg),
            "world_size": dist.world_size(),
            "python_random": [rng["python"] for rng in per_rank],
            **progress_state,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        for f in tmp.iterdir():  # on disk before the rename makes it visible
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())

    def _load_last(self) -> dict:
        found = list_checkpoints(self.run_dir)
        if not found:
            raise PrefcliError(
                f"nothing to resume: no checkpoint in {self.run_dir / 'checkpoints'}",
                "run without --resume to start training, or set --save-every to write checkpoints",
            )
        folder = _check_checkpoint(found)
        state = json.loads((folder / "state.json").read_text())
        _check_resume_config(state.get("config", {}), asdict(self.cfg), folder)
        try:
            set_model_state_dict(self.model, load_file(folder / "model.safetensors"), options=_LOAD)
        except (RuntimeError, KeyError, ValueError) as e:
            raise PrefcliError(
                f"--resume: the model in {folder} has another shape than this run's ({str(e).strip().splitlines()[0][:120]})",
                "resume with the model options (--size, --layers, --dim, ...) the run was started with",
            ) from None
        # Param groups (hyper-parameters) come from this optimizer, the state from the file.
        names = {p: n for n, p in self.model.named_parameters()}
        groups = [{**g, "params": [names[p] for p in g["params"]]} for g in self.optimizer.param_groups]
        saved = _unflatten_optimizer(load_file(folder / "optimizer.safetensors"))
        set_optimizer_state_dict(self.model, self.optimizer, {"state": saved, "param_groups": groups}, options=_LOAD)
        # RNG: this rank's own state when the world size is unchanged, else rank 0's.
        r = dist.rank() if state["world_size"] == dist.world_size() else 0
        rng = load_file(folder / "rng.safetensors")
        torch.set_rng_state(rng[f"cpu.rank{r}"])
        if self.device.type == "cuda" and f"cuda.rank{r}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda.rank{r}"], self.device)
        if self.device.type == "mps" and f"mps.rank{r}" in rng:
            torch.mps.set_rng_state(rng[f"mps.rank{r}"])
        random.setstate(_python_rng_from_json(state["python_random"][r]))
        if dist.is_main():
            _truncate_metrics(self.run_dir / "metrics.jsonl", state["step"])
        dist.barrier()
        return state


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_damage(folder: Path) -> list[str]:
    """Files of a checkpoint that are missing or differ from its checksums.json (none listed: [])."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return []  # written before checkpoints carried checksums
    except (OSError, ValueError):
        return [CHECKSUMS]
    if not isinstance(sums, dict):
        return [CHECKSUMS]
    return [name for name, digest in sums.items() if not (folder / name).is_file() or _sha256(folder / name) != digest]


def _check_checkpoint(found: list[Path]) -> Path:
    """The last checkpoint, refused when damaged (naming the newest good one to fall back to)."""
    last = found[-1]
    bad = checkpoint_damage(last)
    if not bad:
        return last
    good = next((c for c in reversed(found[:-1]) if not checkpoint_damage(c)), None)
    raise PrefcliError(
        f"--resume: checkpoint {last} is damaged ({', '.join(bad)} does not match its checksum)",
        f"the previous good checkpoint is {good.name}: delete {last} to resume from it" if good else
        "no earlier good checkpoint is kept; start again with --overwrite",
    )


def _check_resume_config(started: dict, now: dict, folder: Path) -> None:
    """A resumed run computes the same steps: options other than RESUME_MAY_CHANGE must match."""
    now = json.loads(json.dumps(now))
    changed = [k for k in sorted(started) if k in now and k not in RESUME_MAY_CHANGE and started[k] != now[k]]
    if changed:
        parts = ", ".join(f"--{k.replace('_', '-')} {json.dumps(now[k])} (was {json.dumps(started[k])})" for k in changed)
        raise PrefcliError(
            f"--resume: {folder.parent.parent} was started with other options: {parts}",
            "resume with the options it was started with; only --max-steps, --epochs, --save-every, --eval-every, "
            "--device, --compile may change (or start again with --overwrite)",
        )


def _weightless_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters are on the meta device (no memory; ties kept);
    buffers and every other attribute are copied as they are."""
    memo = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give the meta parameters of `model` real (uninitialised) storage on `device`, ties kept."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    """FSDP2: shard each block of every ModuleList (the transformer layers), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # fully_shard keeps each rank's slice of the weights it is given: make them equal first.
    for t in list(model.parameters()) + list(model.buffers()):
        torch.distributed.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (dist.world_size(),))
    for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP2 warns about every module that returns a view (e.g. logits from a reshape);
    # losses here do not modify model outputs in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")


def _rng_state(device: torch.device) -> dict:
    torch_states = {"cpu": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        torch_states["cuda"] = torch.cuda.get_rng_state(device).tolist()
    if device.type == "mps":
        torch_states["mps"] = torch.mps.get_rng_state().tolist()
    return {"torch": torch_states, "python": _python_rng_to_json(random.getstate())}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step` (and any line cut short by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# ---- metric windows: means over the steps since the last logged line -------------------


def _empty_window(seconds: float) -> dict:
    return {"since": seconds, "steps": 0, "tokens": 0.0, "sums": {}}


def _accumulate(window: dict, out: dict) -> None:
    window["steps"] += 1
    window["tokens"] += out["tokens"]
    for key, value in out.items():
        if key not in ("tokens", "lr"):
            window["sums"][key] = window["sums"].get(key, 0.0) + value


def _window_means(window: dict, step: int, seconds: float, max_steps: int, lr: float) -> dict:
    n = max(1, window["steps"])
    dt = max(seconds - window["since"], 1e-9)
    means = {k: v / n for k, v in window["sums"].items()}
    return {
        "step": step,
        "loss": means.pop("loss"),
        "lr": lr,
        "tokens_per_s": window["tokens"] / dt,
        "elapsed": seconds,
        "eta_s": (max_steps - step) * dt / n,
        **means,
    }


def _si(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"
