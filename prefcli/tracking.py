"""Experiment trackers that mirror metrics.jsonl: `--report-to tensorboard` (and `wandb` when installed).

The trainer writes every logged line to runs/<name>/metrics.jsonl; each reporter gets the
same line. TensorBoard event files go to runs/<name>/tensorboard/ (view them with
`tensorboard --logdir WORKSPACE/runs`). W&B honours its own environment (WANDB_MODE=offline,
WANDB_PROJECT, ...). Only the main process reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prefcli.errors import PrefcliError

CHOICES = ("tensorboard", "wandb")


def check(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in CHOICES and n != "none"]
    if unknown:
        raise PrefcliError(f"--report-to {', '.join(unknown)}: unknown tracker", f"choose from {', '.join(CHOICES)}")
    return [n for n in names if n != "none"]


def open_reporters(names: list[str], run_dir: Path, config: dict | None = None) -> list[Callable[[dict | None], None]]:
    """One function per tracker: call it with a metrics line, or with None at the end (flush and close)."""
    out = []
    for name in check(list(names)):
        out.append(_tensorboard(run_dir) if name == "tensorboard" else _wandb(run_dir, config or {}))
    return out


def _numbers(line: dict) -> dict[str, float]:
    return {k: float(v) for k, v in line.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PrefcliError("--report-to tensorboard needs the tensorboard package", "pip install 'prefcli[tensorboard]'") from None
    writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def report(line: dict | None) -> None:
        if line is None:
            writer.close()
            return
        for key, value in _numbers(line).items():
            writer.add_scalar(key, value, global_step=line["step"])
        writer.flush()

    return report


def _wandb(run_dir: Path, config: dict):
    try:
        import wandb
    except ImportError:
        raise PrefcliError("--report-to wandb needs the wandb package", "pip install wandb (WANDB_MODE=offline works without an account)") from None
    run = wandb.init(name=Path(run_dir).name, dir=str(run_dir), config=config, reinit=True)

    def report(line: dict | None) -> None:
        if line is None:
            run.finish()
            return
        run.log(_numbers(line), step=line["step"])

    return report
