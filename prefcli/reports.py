"""What each command shows a person: rich tables on stderr (the `ls` listing on stdout).

Each renderer takes the command's result (the same dict `--json` prints) and its config.
Tables use a light box and keep every header whole, so they read at 80 columns and in
CI logs as well as on a wide terminal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

console = Console(stderr=True)


def out_console() -> Console:
    """A console on stdout, made when used (tests capture sys.stdout per call)."""
    return Console(file=sys.stdout)


def table(title: str, columns: list[str], **kw) -> Table:
    """A table whose headers are never cut: each column at least as wide as its header."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), **kw)
    for col in columns:
        t.add_column(col, min_width=len(col), overflow="fold")
    return t


def summary_table(title: str, rows: dict) -> None:
    t = Table(title=title, show_header=False, title_justify="left", box=box.SIMPLE, pad_edge=False)
    t.add_column(overflow="fold")
    t.add_column(overflow="fold")
    for k, v in rows.items():
        t.add_row(str(k), f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
    console.print(t)


# ---------------------------------------------------------------- one per command
def nothing(result: dict, cfg=None) -> None:
    """chat prints as it goes."""


def tokenize(r: dict, cfg=None) -> None:
    summary_table("tokenize", {
        "tokenizer": r["tokenizer"], "dataset": r["dataset"], "documents": r["documents"],
        "train tokens": r["train_tokens"], "val tokens": r["val_tokens"],
        "chars per token": r["chars_per_token"], "vocabulary": r["vocab_size"], "seconds": r["seconds"],
    })


def pretrain(r: dict, cfg=None) -> None:
    summary_table(f"pretrain -> models/{r['model']}", {
        k: r[k] for k in ("parameters", "steps", "tokens", "train_loss", "val_loss", "unigram_loss", "tokens_per_s", "seconds")})
    console.print(Text("sample: " + r["sample"]))


def align(r: dict, cfg=None) -> None:
    summary_table(f"align {r['method']} -> models/{r['model']}", {
        k: v for k, v in r.items() if k not in ("model", "method") and not isinstance(v, (dict, list))})


def reward_train(r: dict, cfg=None) -> None:
    summary_table(f"reward train -> models/{r['model']}", {k: v for k, v in r.items() if k != "model" and v is not None})


def reward_score(r: dict, cfg) -> None:
    """Scores are the command's output: one number (--prompt), JSONL rows on stdout, or a note when written to -o."""
    if cfg.output:
        console.print(f"scored {len(r['rows'])} rows into {cfg.output}"
                      + (f" (pair accuracy {r['accuracy']:.3f})" if "accuracy" in r else ""))
    elif cfg.prompt is not None:
        sys.stdout.write(f"{r['rows'][0]['score']:.4f}\n")
    else:
        sys.stdout.write("".join(json.dumps(row) + "\n" for row in r["rows"]))


def perplexity(r: dict, cfg=None) -> None:
    from prefcli.stages.evaluate import perplexity_table

    console.print(perplexity_table(r))


def reward_eval(r: dict, cfg=None) -> None:
    from prefcli.stages.evaluate import reward_table

    console.print(reward_table(r))


def compare(r: dict, cfg=None) -> None:
    from prefcli.stages.evaluate import compare_table

    console.print(compare_table(r))


# ---------------------------------------------------------------- quickstart
def pct(summary: dict | None) -> str:
    if not summary or summary.get("rate") is None:
        return "-"
    lo, hi = summary["ci"]
    half = max(hi - summary["rate"], summary["rate"] - lo)
    return f"{100 * summary['rate']:.0f}±{100 * half:.0f}"


def _good(stats: dict | None) -> dict | None:
    return ((stats or {}).get("gold") or {}).get("good")


def best_model(cmp: dict) -> str:
    """The aligned model with the highest gold good-rate."""
    return max(cmp["models"], key=lambda n: (_good(cmp["models"][n]) or {}).get("rate") or 0)


def verdict(cmp: dict) -> str:
    """One sentence: did alignment work, by the gold judge (the best model's good-rate against sft's, 95% intervals)."""
    best = best_model(cmp)
    b, s = _good(cmp["models"][best]), _good(cmp.get("reference_stats"))
    if not b or not s or b.get("rate") is None or s.get("rate") is None:
        return f"No gold judge on these prompts, so no verdict; {best} is the aligned model to try."

    def show(x: dict) -> str:
        return f"{100 * x['rate']:.0f}% [{100 * x['ci'][0]:.0f}-{100 * x['ci'][1]:.0f}]"

    if b["ci"][0] > s["ci"][1]:
        how = "Alignment worked"
    elif b["ci"][1] < s["ci"][0]:
        how = "Alignment made things worse"
    else:
        how = "Alignment did not clearly help (the intervals overlap)"
    return f"{how}: by the gold judge {best} gives good replies {show(b)} of the time, sft {show(s)} (95% intervals)."


def quickstart(r: dict, cfg=None) -> None:
    stages = table(f"quickstart: {r['seconds']:.0f} s in all", ["stage", "seconds", "result"])
    for s in r["stages"]:
        stages.add_row(s["stage"], f"{s['seconds']:.1f}", s["metric"])
    console.print(stages)
    cmp = r["comparison"]
    t = table(f"against sft on {cmp['prompts']} held-out prompts, gold judge, % ± 95% interval",
              ["model", "good", "win", "correct", "polite", "concise", "RM win", "KL", "dist-2", "len"])
    ref = cmp.get("reference_stats") or {}
    if ref.get("gold"):
        t.add_row("sft", pct(ref["gold"]["good"]), "", "", "", "", "", "", f"{ref['distinct_2']:.2f}", f"{ref['mean_length']:.0f}")
    for name, m in cmp["models"].items():
        vs = m.get("vs_reference", {})
        by_attr = vs.get("win_rate_gold_by_attribute", {})
        kl = vs.get("kl", {}).get("mean")
        t.add_row(name, pct(_good(m)), pct(vs.get("win_rate_gold")),
                  *(pct(by_attr.get(a)) for a in ("correct", "polite", "concise")),
                  pct(vs.get("win_rate_reward")), "-" if kl is None else f"{kl:.2f}",
                  f"{m['distinct_2']:.2f}", f"{m['mean_length']:.0f}")
    console.print(t)
    console.print("good: share of replies the gold judge rates correct, polite and concise. win: gold-judge win rate "
                  "over sft (ties half); correct/polite/concise: the same per attribute; RM win: by the reward model; "
                  "KL: KL(policy || sft) in nats per reply; len: tokens per reply.", highlight=False)
    best = best_model(cmp)
    ws_flag = f"-w {r['workspace']} "
    saved = f" The comparison is saved as {r['eval']}." if r.get("eval") else ""
    console.print(f"\n{verdict(cmp)}{saved}\nChat with the best model:\n  prefcli {ws_flag}chat --model {best}\n"
                  f"  prefcli {ws_flag}chat --model {best} --prompt 'What is 3 plus 4?'\n"
                  f"  prefcli {ws_flag}ls", highlight=False, soft_wrap=True)  # unwrapped: commands to copy


# ---------------------------------------------------------------- ls
def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def key_metrics(metrics: dict, limit: int = 3) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])


def ls_table(root: Path, rows: list[dict]) -> None:
    """The listing: on stdout, since it is what the command is for."""
    if not rows:
        out_console().print(f"workspace {root} has no artifacts yet (start with `prefcli tokenize`)", highlight=False)
        return
    t = table(f"workspace {root}", ["kind", "name", "created", "parents", "size", "metrics", "status"])
    for r in rows:
        t.add_row(r["type"], r["name"], (r["created"] or "")[:19].replace("T", " "), ", ".join(r["parents"]),
                  human_size(r["size"]), key_metrics(r["metrics"]), "[red]damaged[/red]" if r["damaged"] else "ok")
    out_console().print(t)


def ls_one(doc: dict) -> None:
    row, meta = doc["artifact"], doc["meta"]
    con = out_console()
    t = Table(title=f"{row['type']} {row['name']}", show_header=False, title_justify="left", box=box.SIMPLE, pad_edge=False)
    t.add_column(overflow="fold")
    t.add_column(overflow="fold")
    rows = {"path": row["path"], "created": row["created"], "stage": meta.get("stage"), "size": human_size(row["size"]),
            "status": "damaged: " + ", ".join(row["damaged"]) if row["damaged"] else "ok",
            **{f"metric {k}": v for k, v in meta.get("metrics", {}).items()}}
    for k, v in rows.items():
        t.add_row(str(k), str(v))
    con.print(t)
    con.print(lineage_tree(doc["lineage"]))


def lineage_tree(node: dict, tree: Tree | None = None) -> Tree:
    label = f"{node.get('kind')} [bold]{node.get('name') or node.get('path')}[/bold]"
    if node.get("stage"):
        label += f" (by {node['stage']}, {(node.get('created') or '')[:19].replace('T', ' ')})"
    branch = Tree(label) if tree is None else tree.add(label)
    for parent in node.get("parents", []):
        lineage_tree(parent, branch)
    return branch
