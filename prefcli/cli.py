"""The command line: one command per stage. Options become the stage's config; no ML here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from prefcli import __version__
from prefcli.config import build_config
from prefcli.errors import PrefcliError
from prefcli.workspace import Workspace

console = Console(stderr=True)
app = typer.Typer(
    name="prefcli",
    help="End-to-end alignment workflows: tokenizer, pretraining, SFT, reward models, DPO/PPO/GRPO, chat and eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_state: dict[str, Any] = {"workspace": None}

# Options shared by every command, declared once.
JSON_OPT = typer.Option(False, "--json", help="Print one JSON document on stdout.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace an existing artifact of the same name.")
CONFIG_OPT = typer.Option(None, "--config", help="TOML file of options; command-line options win.")
SEED_OPT = typer.Option(None, "--seed", help="Random seed.")


def workspace() -> Workspace:
    return Workspace(_state["workspace"])


def emit(result: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    """Machine-readable JSON on stdout with --json; otherwise a human summary on stderr."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        render(result)


def summary_table(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in rows.items():
        table.add_row(str(k), f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    workspace_dir: Optional[Path] = typer.Option(
        None, "--workspace", "-w", envvar="PREFCLI_WORKSPACE",
        help="Workspace folder (default: $PREFCLI_WORKSPACE, else ./workspace).",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    _state["workspace"] = workspace_dir


# ---------------------------------------------------------------- tokenize
@app.command()
def tokenize(
    input: Optional[list[str]] = typer.Option(None, "--input", "-i", help="Text files, folders or globs (.txt split at blank lines; .jsonl/.json/.parquet rows). Default: the built-in demo corpus."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding the text in .jsonl/.json/.parquet rows (default: text)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Vocabulary size, special tokens included (default 2048)."),
    min_frequency: Optional[int] = typer.Option(None, "--min-frequency", help="Minimum count for a merge (default 2)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of documents held out for validation (default 0.05)."),
    name: Optional[str] = typer.Option(None, "--name", help="Tokenizer artifact name (default: default)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset artifact name (default: corpus)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Reuse this tokenizer instead of training one."),
    seed: Optional[int] = SEED_OPT,
    config: Optional[Path] = CONFIG_OPT,
    overwrite: bool = OVERWRITE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Train a byte-level BPE tokenizer and encode the corpus into a token dataset."""
    from prefcli.stages import tokenize as stage

    cfg = build_config(stage.TokenizeConfig, config, "tokenize", input=input or None, text_field=text_field,
                       vocab_size=vocab_size, min_frequency=min_frequency, val_fraction=val_fraction, name=name,
                       dataset=dataset, tokenizer=tokenizer, seed=seed, overwrite=overwrite or None)
    result = stage.run(cfg, workspace())
    emit(result, as_json, lambda r: summary_table("tokenize", {
        "tokenizer": r["tokenizer"], "dataset": r["dataset"], "documents": r["documents"],
        "train tokens": r["train_tokens"], "val tokens": r["val_tokens"],
        "chars per token": r["chars_per_token"], "vocabulary": r["vocab_size"], "seconds": r["seconds"],
    }))


# ---------------------------------------------------------------- ls
def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _key_metrics(metrics: dict, limit: int = 3) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])


@app.command("ls")
def ls(
    name: Optional[str] = typer.Argument(None, help="Show one artifact's metadata and lineage."),
    as_json: bool = JSON_OPT,
) -> None:
    """List the workspace's artifacts, or show one with its lineage."""
    ws = workspace()
    if name is None:
        rows = ws.artifacts()
        if as_json:
            sys.stdout.write(json.dumps({"workspace": str(ws.root), "artifacts": rows}, indent=2) + "\n")
            return
        table = Table(title=f"workspace {ws.root}", title_justify="left")
        for col in ("kind", "name", "created", "parents", "size", "metrics", "status"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["type"], r["name"], (r["created"] or "")[:19].replace("T", " "), ", ".join(r["parents"]),
                          _human_size(r["size"]), _key_metrics(r["metrics"]),
                          "[red]damaged[/red]" if r["damaged"] else "ok")
        console.print(table if rows else f"workspace {ws.root} has no artifacts yet (start with `prefcli tokenize`)")
        return
    matches = ws.find(name)
    if not matches:
        raise PrefcliError(f"no artifact named '{name}' in workspace {ws.root}", "run `prefcli ls` to see what is there")
    docs = []
    for row in matches:
        path = Path(row["path"])
        meta = json.loads(path.read_text()).get("meta", {}) if row["kind"] == "evals" else json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
        docs.append({"artifact": row, "meta": meta, "lineage": ws.lineage(row["kind"], name)})
    if as_json:
        sys.stdout.write(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, default=str) + "\n")
        return
    for doc in docs:
        row, meta = doc["artifact"], doc["meta"]
        summary_table(f"{row['type']} {row['name']}", {
            "path": row["path"], "created": row["created"], "stage": meta.get("stage"),
            "size": _human_size(row["size"]), "status": "damaged: " + ", ".join(row["damaged"]) if row["damaged"] else "ok",
            **{f"metric {k}": v for k, v in meta.get("metrics", {}).items()},
        })
        console.print(_lineage_tree(doc["lineage"]))


def _lineage_tree(node: dict, tree: Tree | None = None) -> Tree:
    label = f"{node.get('kind')} [bold]{node.get('name') or node.get('path')}[/bold]"
    if node.get("stage"):
        label += f" (by {node['stage']}, {(node.get('created') or '')[:19].replace('T', ' ')})"
    branch = Tree(label) if tree is None else tree.add(label)
    for parent in node.get("parents", []):
        _lineage_tree(parent, branch)
    return branch


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="prefcli")
    except PrefcliError as e:
        line = Text("error: ", style="bold red")
        line.append(e.message + (f" (hint: {e.hint})" if e.hint else ""))
        console.print(line, highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
