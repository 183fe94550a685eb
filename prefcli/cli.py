"""The command line, generated from the stage registry and the config dataclasses. No ML here.

Each command in prefcli.stages.COMMANDS becomes a Typer command whose options are its
config's fields (prefcli.config.option: help, flag, choices, range); --help shows every
default and the choices of closed options. A few commands that are not stages (ls,
eval plot, pipeline run) are written out by hand below.

(Over 400 lines: the generator, the commands that are not stages and main()'s one-line errors.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.text import Text

from prefcli import __version__, reports, stages
from prefcli.config import field_meta, field_type, flag_of
from prefcli.errors import PrefcliError
from prefcli.reports import console
from prefcli.workspace import Workspace

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _plain_help(cmd, ctx):
    """-h/--help listed without a type (click would show <bool>)."""
    opt = super(type(cmd), cmd).get_help_option(ctx)
    if opt is not None:
        opt.metavar = ""
    return opt


class Command(typer.core.TyperCommand):
    get_help_option = _plain_help


class Group(typer.core.TyperGroup):
    get_help_option = _plain_help


app = typer.Typer(
    cls=Group,
    name="prefcli",
    help="End-to-end alignment workflows: tokenizer, pretraining, SFT, reward models, DPO/PPO/GRPO, chat and eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings=CONTEXT,
)
_state: dict[str, Any] = {"workspace": None}

WORKSPACE_HELP = "Workspace folder (default: $PREFCLI_WORKSPACE, else ./workspace)."
# Options of every generated command that are not config fields (pipeline.py skips them too).
EXTRAS = stages.CLI_EXTRAS
TRAINING = {"max_steps", "epochs", "batch_size", "grad_accum", "lr", "warmup", "eval_every", "save_every", "resume", "compile",
            "fsdp"}
FAMILY_NAMES = {stages.SFT: "sft", stages.PREFERENCE: "dpo family", stages.RL: "online RL", stages.STEER: "steer"}


def workspace(given: Path | None = None) -> Workspace:
    """-w after the command wins over -w before it (and $PREFCLI_WORKSPACE)."""
    return Workspace(given if given is not None else _state["workspace"])


def emit(result: dict, as_json: bool, render) -> None:
    """Machine-readable JSON on stdout with --json; otherwise a human summary. Rank 0 only under torchrun."""
    from prefcli import distributed as dist

    if not dist.is_main():
        return
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        render(result)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """--threads N for the command's duration (restored after, for in-process callers such as pipeline)."""
    if n is None:
        yield
        return
    if n < 1:
        raise PrefcliError(f"--threads {n}: must be at least 1")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    workspace_dir: Optional[Path] = typer.Option(None, "--workspace", "-w", envvar="PREFCLI_WORKSPACE", help=WORKSPACE_HELP,
                                                 metavar="DIR"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit.",
                                 metavar=""),
) -> None:
    _state["workspace"] = workspace_dir


# ---------------------------------------------------------------- generating commands from configs
@dataclasses.dataclass
class _Field:
    """One option of a generated command: a config field, possibly shared by several align methods."""
    name: str
    classes: list  # the config classes that have it (align: one per method family)

    @property
    def cls(self) -> type:
        return self.classes[0]

    @property
    def meta(self) -> dict:
        return field_meta(self.cls, self.name)


def _default_text(cls: type, name: str) -> str | None:
    meta = field_meta(cls, name)
    f = cls.__dataclass_fields__[name]
    module = sys.modules[cls.__module__]
    if name == "max_steps" and getattr(module, "DEFAULT_STEPS", None) and f.default is None and "per stage" == meta.get("default_text"):
        return str(module.DEFAULT_STEPS)
    if "default_text" in meta:
        return meta["default_text"]
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(value, bool):
        return None if not value else "on"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def _shown_default(fld: _Field) -> str | None:
    """The default --help shows; for an align option whose default differs by method, each family's."""
    by_text: dict[str | None, list[str]] = {}
    for c in fld.classes:
        by_text.setdefault(_default_text(c, fld.name), []).append(FAMILY_NAMES.get(f"{c.__module__}:{c.__name__}", c.__name__))
    if len(by_text) == 1:
        return next(iter(by_text))
    return "; ".join(f"{', '.join(families)}: {text or 'off'}" for text, families in by_text.items())


def _panel(fld: _Field, command: str) -> str | None:
    if fld.name in TRAINING and "resume" in fld.cls.__dataclass_fields__:
        return "Training"
    if command != "align":
        return None
    families = [f"{c.__module__}:{c.__name__}" for c in fld.classes]
    if len(families) == 1:
        return stages.FAMILY_PANELS[families[0]]
    if set(families) == {stages.PREFERENCE, stages.RL}:
        return "preference and online RL"
    return "Common"


_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


def _parameter(fld: _Field, command: str) -> inspect.Parameter:
    meta = fld.meta
    base, is_list = field_type(fld.cls, fld.name)
    flag = flag_of(fld.cls, fld.name)
    decls = [flag]
    if base is bool:
        annotation: Any = Optional[bool]
        if _default_text(fld.cls, fld.name) == "on":
            decls = [f"{flag}/--no-{flag[2:]}"]
        metavar = ""
    else:
        scalar = str if base is Path else base
        annotation = Optional[list[scalar]] if is_list else Optional[scalar]
        metavar = meta.get("metavar") or ("|".join(meta["choices"]) if meta.get("choices") else _METAVARS.get(base, "TEXT"))
    if meta.get("short"):
        decls.append(meta["short"])
    text = meta["help"] + (" Repeatable." if is_list and "repeat" not in meta["help"].lower() else "")
    shown = _shown_default(fld)
    if shown is not None:
        text += f" [default: {shown}]"
    option = typer.Option(None, *decls, help=escape(text), metavar=metavar, show_default=False,
                          rich_help_panel=_panel(fld, command))
    return inspect.Parameter(fld.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _extras(spec: stages.Command) -> list[inspect.Parameter]:
    def p(name, annotation, *decls, default=None, help, metavar, panel="Run"):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                 default=typer.Option(default, *decls, help=escape(help), metavar=metavar, rich_help_panel=panel))

    params = [p("config_file", Optional[Path], "--config", help=f"TOML file of options (top level, or a [{spec.section}] table); "
                                                                "command-line options win.", metavar="FILE"),
              p("workspace_dir", Optional[Path], "--workspace", "-w", help=WORKSPACE_HELP, metavar="DIR"),
              p("as_json", bool, "--json", default=False, help="Print one JSON document on stdout." if not spec.json_by_run
                else "Print the conversation as JSON messages on stdout at the end.", metavar="")]
    if spec.computes:
        params.append(p("threads", Optional[int], "--threads", help="CPU threads for torch [default: torch's choice, or $OMP_NUM_THREADS].",
                        metavar="N"))
    return params


def _fields(spec: stages.Command) -> list[_Field]:
    """The config fields a command shows as options (those with help); align: the union over its methods."""
    classes = [stages.method_config(m) for m in dict.fromkeys(stages.METHODS)] if spec.name == "align" else [spec.config_class()]
    families = list(dict.fromkeys(classes))
    out: dict[str, _Field] = {}
    for cls in families:
        for f in dataclasses.fields(cls):
            if "help" not in field_meta(cls, f.name) or (spec.name == "align" and f.name == "method"):
                continue  # settable from a TOML file only; align's --method is its own option
            out.setdefault(f.name, _Field(f.name, [])).classes.append(cls)
    return list(out.values())


def _help(spec: stages.Command) -> str:
    text = spec.help
    if spec.name == "align":
        width = max(map(len, stages.METHODS))
        lines = [f"{name:{width}s}  {doc}" for name, doc in stages.method_docs().items()]
        text += "\n\nMethods (--method):\n" + "\n".join(lines)
    return escape(text) + "\n\nExample: " + escape(spec.example)


def add_command(target: typer.Typer, spec: stages.Command, name: str) -> None:
    """Register the generated command for one registry entry."""
    fields = _fields(spec)
    params = [_parameter(f, spec.name) for f in fields]
    order = ["Common", None, *stages.FAMILY_PANELS.values()]  # then the rest, then Training
    params.sort(key=lambda p: order.index(p.default.rich_help_panel) if p.default.rich_help_panel in order else len(order) + (p.default.rich_help_panel == "Training"))
    if spec.name == "align":
        params.insert(0, inspect.Parameter("method", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
            ..., "--method", "-m", metavar="|".join(stages.METHODS), help="Alignment method (see above).")))
    params += _extras(spec)

    def command(**kw: Any) -> None:
        ws_dir, config_file, as_json, threads = (kw.pop(k, None) for k in ("workspace_dir", "config_file", "as_json", "threads"))
        method = kw.pop("method", None)
        given = {k: (list(v) or None) if isinstance(v, (list, tuple)) else v for k, v in kw.items()}
        cfg = stages.build(spec.name, given, config_file, method=method)
        with torch_threads(threads):
            ws = workspace(ws_dir)
            if spec.json_by_run:
                stages.run(spec.name, cfg, ws, as_json=as_json)
                return
            result = stages.run(spec.name, cfg, ws)
        emit(result, bool(as_json), lambda r: spec.renderer()(r, cfg))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = name.replace("-", "_")
    target.command(name, help=_help(spec), cls=Command)(command)


reward_app = typer.Typer(cls=Group, help="Train reward models on preference pairs, and score replies with them.", no_args_is_help=True)
eval_app = typer.Typer(cls=Group, help="Measure models: perplexity, reward-model accuracy, side-by-side comparison, charts.",
                       no_args_is_help=True)
pipeline_app = typer.Typer(cls=Group, help="Run a whole workflow from one TOML file, skipping stages that are up to date.",
                           no_args_is_help=True)
for _spec in stages.COMMANDS.values():
    _group, _, _sub = _spec.name.rpartition(" ")
    add_command({"": app, "reward": reward_app, "eval": eval_app}[_group], _spec, _sub)
app.add_typer(reward_app, name="reward")
app.add_typer(eval_app, name="eval")
app.add_typer(pipeline_app, name="pipeline")


# ---------------------------------------------------------------- commands that are not stages
WS_OPT = typer.Option(None, "--workspace", "-w", help=WORKSPACE_HELP, metavar="DIR")
JSON_OPT = typer.Option(False, "--json", help="Print one JSON document on stdout.", metavar="")


@eval_app.command("plot", cls=Command)
def eval_plot(
    names: Optional[list[str]] = typer.Argument(None, help="Evals to chart (default: all in evals/)."),
    run: Optional[list[str]] = typer.Option(None, "--run", help="Runs whose training curves to draw (default: all in runs/)."),
    out: Optional[str] = typer.Option(None, "--out", help="Name of the training-curves chart, evals/<name>-training.png [default: runs]."),
    workspace_dir: Optional[Path] = WS_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Draw PNG charts: training curves of runs/*/metrics.jsonl, and each eval's charts.

    Example: prefcli eval plot compare-dpo --run dpo
    """
    from prefcli import plots
    from prefcli.workspace import check_name

    ws = workspace(workspace_dir)
    paths = [str(p) for p in plots.plot_workspace(ws, names or None, run or None, check_name(out or "runs"))]
    emit({"plots": paths}, as_json, lambda r: console.print(
        "\n".join(f"wrote {p}" for p in r["plots"]) or f"nothing to plot in {ws.root}"))


@pipeline_app.command("run", cls=Command)
def pipeline_run(
    ctx: typer.Context,
    file: Path = typer.Argument(..., metavar="FILE", help="Pipeline file: [[stage]] tables with a command and its options (see examples/pipeline.toml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (run / skip / re-run / always) and run nothing.",
                                 metavar=""),
    force: bool = typer.Option(False, "--force", help="Run every stage, even those that are up to date.", metavar=""),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="[N.]OPTION=VALUE", help="Override an option: N.option=value for stage N, or option=value for every stage that takes it."),
    workspace_dir: Optional[Path] = WS_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary of the run (stages, status, seconds) on stdout.",
                                 metavar=""),
) -> None:
    """Run the stages of FILE in order; a stage whose output exists with the same config and inputs is skipped.

    Example: prefcli pipeline run examples/pipeline.toml --dry-run
    """
    from prefcli.stages import pipeline as stage

    # -w on the command line wins over the file's `workspace`, which wins over $PREFCLI_WORKSPACE.
    source = ctx.find_root().get_parameter_source("workspace_dir")
    given = workspace_dir if workspace_dir is not None else (
        _state["workspace"] if getattr(source, "name", None) == "COMMANDLINE" else None)
    result = stage.run(file, given, sets=set_ or None, force=force, dry_run=dry_run, quiet_stdout=as_json,
                       group=typer.main.get_command(app), invoke_main=main)
    emit(result, as_json, lambda r: console.print(stage.summary_table(r)))
    if result["exit_code"]:
        raise typer.Exit(result["exit_code"])


@app.command("ls", cls=Command)
def ls(
    name: Optional[str] = typer.Argument(None, help="Show one artifact's metadata and lineage."),
    workspace_dir: Optional[Path] = WS_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """List the workspace's artifacts (on stdout), or show one with its lineage.

    Example: prefcli ls dpo
    """
    ws = workspace(workspace_dir)
    if name is None:
        rows = ws.artifacts()
        emit({"workspace": str(ws.root), "artifacts": rows}, as_json, lambda r: reports.ls_table(ws.root, rows))
        return
    matches = ws.find(name)
    if not matches:
        raise PrefcliError(f"no artifact named '{name}' in workspace {ws.root}", "run `prefcli ls` to see what is there")
    docs = []
    for row in matches:
        path = Path(row["path"])
        meta = json.loads(path.read_text()).get("meta", {}) if row["kind"] == "evals" else json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
        docs.append({"artifact": row, "meta": meta, "lineage": ws.lineage(row["kind"], name)})
    emit(docs[0] if len(docs) == 1 else docs, as_json, lambda r: [reports.ls_one(doc) for doc in docs])


@app.command("import", cls=Command)
def import_(
    source: Path = typer.Argument(..., metavar="SOURCE", help="A local HF model folder (config.json + safetensors + tokenizer) or a .gguf file."),
    name: Optional[str] = typer.Option(None, "--name", help="Model artifact name (default: from the source's name)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model of the same name.", metavar=""),
    workspace_dir: Optional[Path] = WS_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Bring a local model into the workspace, with lineage and sha256 (a GGUF file is dequantised; it needs the gguf extra).

    Example: prefcli import SmolLM2-135M-Instruct.Q4_1.gguf --name smol
    """
    from prefcli.stages import import_model as stage

    result = stage.run(stage.ImportConfig(source=str(source), name=name, overwrite=overwrite), workspace(workspace_dir))
    emit(result, as_json, lambda r: reports.summary_table(f"import -> models/{r['model']}", r))


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Run one command. Whatever goes wrong ends in one line on stderr: exit 2 for bad input
    (PrefcliError), 1 for a runtime failure, 130 for Ctrl-C; names locked for the command
    are released, and a failed command's new run folder without a checkpoint is removed."""
    import os

    from prefcli.workspace import release_claims

    def fail(message: str, hint: str | None, code: int):
        line = Text("error: ", style="bold red")
        line.append(" ".join(message.split()) + (f" (hint: {' '.join(hint.split())})" if hint else ""))
        console.print(line, highlight=False, soft_wrap=True)
        sys.exit(code)

    ok = False
    try:
        app(args=argv, prog_name="prefcli")
        ok = True
    except SystemExit as e:
        ok = e.code in (0, None)
        if e.code == 130:
            kept = release_claims(False)
            ok = True  # released already
            console.print(_interrupted_line(kept), highlight=False, soft_wrap=True)
        raise
    except PrefcliError as e:
        fail(e.message, e.hint, e.exit_code)
    except UnicodeDecodeError as e:  # text read from a pipe or a file not opened by a reader of ours
        fail(f"input is not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})", "send UTF-8 text", 2)
    except MemoryError:
        fail("out of memory", "use a smaller --batch-size, --context or model", 1)
    except OSError as e:
        import errno

        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            fail(f"no space left on device{f' writing {e.filename}' if e.filename else ''}",
                 "free some disk space, then run again (a training run continues with --resume)", 1)
        fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", None, 1)
    except Exception as e:
        if os.environ.get("PREFCLI_DEBUG"):
            raise
        fail(f"unexpected {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
             "this is a bug in prefcli; run again with PREFCLI_DEBUG=1 for the traceback", 1)
    finally:
        release_claims(ok)
        if "prefcli.trainer" in sys.modules:
            sys.modules["prefcli.trainer"].position.clear()
        if ok and "prefcli.distributed" in sys.modules:  # under torchrun: leave the process group
            sys.modules["prefcli.distributed"].destroy_distributed()


def _interrupted_line(kept: list) -> Text:
    """What Ctrl-C leaves: the step reached and how to continue, or that nothing was written."""
    trainer = sys.modules.get("prefcli.trainer")
    step = trainer.position.get("step") if trainer is not None else None
    line = Text("interrupted", style="bold yellow")
    if kept:
        at = f" at step {step}" if step is not None else ""
        last = sorted(kept[0].glob("checkpoints/step-*"))
        since = f" (from its checkpoint {last[-1].name})" if last else ""
        line.append(f"{at}; {kept[0]} is kept: continue with --resume{since}")
    elif step is not None:
        line.append(f" at step {step}, before the first checkpoint; nothing was written")
    else:
        line.append("; nothing was written")
    return line


if __name__ == "__main__":
    main()
