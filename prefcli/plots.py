"""PNG charts of training runs and evaluations, with matplotlib (the optional `plot` extra).

- training curves: loss (and every val_* metric) against step, from runs/<name>/metrics.jsonl
- reward distributions: histograms of a reward model's chosen and rejected rewards (eval reward)
- win rates and good-rates with their 95% intervals (eval compare)

Charts go to evals/<name>-<chart>.png, each written to a temporary file and renamed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from prefcli.errors import PrefcliError
from prefcli.workspace import Workspace, check_name


def require_matplotlib():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PrefcliError("--plot needs matplotlib, which is not installed", "pip install 'prefcli[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.pid{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl (a broken last line, from a killed run, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def training_curves(ws: Workspace, runs: list[str] | None, path: Path) -> Path | None:
    """One panel per run: loss and every val_* metric against step. None when no run has metrics."""
    plt = require_matplotlib()
    folder = ws.folder("runs")
    names = runs if runs is not None else sorted(p.name for p in folder.glob("*") if p.is_dir()) if folder.is_dir() else []
    for n in names:
        check_name(n, "--run")
    data = {n: read_metrics(folder / n) for n in names}
    data = {n: rows for n, rows in data.items() if rows}
    if not data:
        return None
    cols = min(3, len(data))
    rows_n = math.ceil(len(data) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (name, rows) in zip(axes.flat, data.items()):
        keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("val_")})
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if k != "loss" else None, markersize=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(data):]:
        ax.axis("off")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def reward_histogram(doc: dict, path: Path) -> Path:
    """Chosen and rejected rewards of an `eval reward` document, overlaid."""
    plt = require_matplotlib()
    chosen, rejected = doc["rewards"]["chosen"], doc["rewards"]["rejected"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo, hi = min(chosen + rejected), max(chosen + rejected)
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    ax.hist(chosen, bins=bins, alpha=0.6, label=f"chosen (mean {doc['chosen']['mean']:.2f})")
    ax.hist(rejected, bins=bins, alpha=0.6, label=f"rejected (mean {doc['rejected']['mean']:.2f})")
    acc = doc["accuracy"]
    ax.set_title(f"{doc['model']}: accuracy {acc['rate']:.3f} on {doc['pairs']} pairs")
    ax.set_xlabel("reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def _bars(ax, labels: list[str], rates: list[dict | None], title: str, line: float | None = None) -> None:
    xs = list(range(len(labels)))
    vals = [r["rate"] if r else 0.0 for r in rates]
    err = [[max(0.0, r["rate"] - r["ci"][0]) if r else 0 for r in rates],
           [max(0.0, r["ci"][1] - r["rate"]) if r else 0 for r in rates]]
    ax.bar(xs, vals, yerr=err, capsize=4, color="#4c72b0")
    for x, v, r in zip(xs, vals, rates):
        ax.text(x, (r["ci"][1] if r else v) + 0.02, f"{v:.2f}" if r else "-", ha="center", fontsize=8)
    if line is not None:
        ax.axhline(line, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(xs, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_title(title, fontsize=10)


def compare_chart(doc: dict, path: Path) -> Path | None:
    """Win rates against the reference (gold / judge RM) and gold good-rates, with 95% intervals."""
    plt = require_matplotlib()
    panels = []
    models = doc["models"]
    if doc.get("reference"):
        for key, label in (("win_rate_gold", "gold"), ("win_rate_reward", "judge RM")):
            rates = [st.get("vs_reference", {}).get(key) for st in models.values()]
            if any(rates):
                panels.append((list(models), rates, f"win rate vs {doc['reference']} ({label})", 0.5))
    if doc.get("gold_judge"):
        cols = dict(models)
        if doc.get("reference_stats"):
            cols[f"{doc['reference']} (ref)"] = doc["reference_stats"]
        panels.append((list(cols), [st["gold"]["good"] for st in cols.values()], "gold good rate", None))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (labels, rates, title, line) in zip(axes.flat, panels):
        _bars(ax, labels, rates, title, line)
    fig.suptitle(f"{doc['prompts']} prompts x {doc['samples_per_prompt']} sample(s), 95% intervals", fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_eval(ws: Workspace, name: str, doc: dict) -> list[Path]:
    """The charts of one eval document into evals/<name>-*.png: its own chart, and the
    training curves of the models it measured (those with a run folder)."""
    require_matplotlib()
    folder = ws.folder("evals")
    stage = doc.get("meta", {}).get("stage", "")
    out = []
    if stage == "eval reward" and doc.get("rewards"):
        out.append(reward_histogram(doc, folder / f"{name}-rewards.png"))
    elif stage == "eval compare":
        out.append(compare_chart(doc, folder / f"{name}-rates.png"))
    runs = [p["name"] for p in doc.get("meta", {}).get("parents", [])
            if p.get("kind") == "models" and (ws.folder("runs") / str(p.get("name"))).is_dir()]
    if runs:
        out.append(training_curves(ws, list(dict.fromkeys(runs)), folder / f"{name}-training.png"))
    return [p for p in out if p is not None]


def plot_workspace(ws: Workspace, evals: list[str] | None = None, runs: list[str] | None = None,
                   prefix: str = "runs") -> list[Path]:
    """Training curves of the runs (default: all) into evals/<prefix>-training.png, and the
    charts of each named eval (default: all)."""
    require_matplotlib()
    out = []
    curves = training_curves(ws, runs, ws.folder("evals") / f"{prefix}-training.png")
    if curves is not None:
        out.append(curves)
    folder = ws.folder("evals")
    names = evals if evals is not None else sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    for n in names:
        check_name(n, "eval plot NAME")
        path = folder / f"{n}.json"
        if not path.is_file():
            raise PrefcliError(f"eval plot: no eval named '{n}' in {folder}", "run `prefcli ls` to see the evals")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PrefcliError(f"{path}: not valid JSON ({e.msg})", "re-run the eval with --overwrite") from None
        out += plot_eval(ws, n, doc)
    return out
