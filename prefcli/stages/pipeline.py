"""`prefcli pipeline run FILE.toml`: run a workflow's stages in order, skipping those already up to date.

The file lists stages, each a command with its own command-line options:

    workspace = "ws"                       # optional; -w on the command line wins
    [[stage]]
    command = "pretrain"
    options = { layers = 2, dim = 64, max-steps = 300 }

Every stage runs through the same code path as the command typed by hand: the
caller (prefcli/cli.py) hands over its click command group and its `main`, so this
module never imports the command line. A stage is skipped when its output artifact exists, records
the config the stage would run with now, and every parent artifact it records is
unchanged (same `created` time, not rebuilt earlier in this run). Otherwise it
runs, with --overwrite. Stages whose output is not tracked (chat, reward score,
eval plot, ls) always run.

(A little over 400 lines: reading and checking the file, deciding what is up to date and
running the stages are one job, and each part is short.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefcli import stages as registry
from prefcli.config import resolved, to_dict, tomllib
from prefcli.errors import PrefcliError
from prefcli.workspace import KINDS, Workspace, check_name, damaged_files, default_root, read_meta

# Commands whose outputs can be tracked (the rest always run); their configs come from the stage registry.
TRACKED = ("tokenize", "pretrain", "align", "reward train", "eval perplexity", "eval reward", "eval compare")
IGNORED = {"overwrite", "resume", "fsdp"}  # how a stage was run, not what it made
STAGE_KEYS = {"command", "options", "args"}


@dataclass
class Stage:
    number: int
    command: str  # "align", "reward train", ...
    argv: list[str]  # the command's own arguments
    outputs: list[tuple[str, str]] | None = None  # (kind, name); None: not tracked, always runs
    config: dict | None = None  # the config the stage records in meta.json, as JSON
    takes_overwrite: bool = False


@dataclass
class Pipeline:
    path: Path
    workspace: str | None
    stages: list[Stage] = field(default_factory=list)


# ---------------------------------------------------------------- reading the file
def load(path: Path | str, sets: list[str] | None, group: Any) -> Pipeline:
    """Read and check the whole file (and --set overrides) before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise PrefcliError(f"pipeline file {path} not found", "pass the path of a TOML file (see examples/pipeline.toml)")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PrefcliError(f"{path}: not valid TOML ({e})", "fix the file; see examples/pipeline.toml")
    unknown = sorted(set(doc) - {"workspace", "stage"})
    if unknown:
        raise PrefcliError(f"{path}: unknown key '{unknown[0]}'", "a pipeline file holds `workspace = ...` and [[stage]] tables")
    workspace = doc.get("workspace")
    if workspace is not None and not isinstance(workspace, str):
        raise PrefcliError(f"{path}: workspace must be a string (a folder)")
    tables = doc.get("stage")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise PrefcliError(f"{path}: no stages", "list them as [[stage]] tables with a `command` and `options`")

    commands = [_command(group, t, path, n) for n, t in enumerate(tables, 1)]
    options = [dict(t.get("options", {})) for t in tables]
    _apply_sets(sets or [], commands, options, path)

    pipeline = Pipeline(path, workspace)
    for n, (table, (name, cmd), opts) in enumerate(zip(tables, commands, options), 1):
        where = f"{path}: stage {n} ({name})"
        try:
            pipeline.stages.append(_stage(n, name, cmd, table, opts))
        except PrefcliError as e:
            raise PrefcliError(f"{where}: {e.message}", e.hint) from None
    seen: dict[tuple[str, str], int] = {}
    for s in pipeline.stages:
        for out in s.outputs or []:
            if out in seen:
                raise PrefcliError(f"{path}: stages {seen[out]} and {s.number} both write {out[0]}/{out[1]}",
                                   "give one of them another name with `out` (or `name`/`dataset` for tokenize)")
            seen[out] = s.number
    return pipeline


def _command(group: Any, table: dict, path: Path, n: int) -> tuple[str, Any]:
    extra = sorted(set(table) - STAGE_KEYS)
    if extra:
        raise PrefcliError(f"{path}: stage {n}: unknown key '{extra[0]}'", "a stage has `command`, `options` and optionally `args`")
    name = table.get("command")
    if not isinstance(name, str) or not name.split():
        raise PrefcliError(f"{path}: stage {n}: no command", 'set command = "tokenize" (or "pretrain", "align", "reward train", ...)')
    cmd = group
    for word in name.split():
        sub = cmd.commands.get(word) if _is_group(cmd) else None
        if sub is None or word == "pipeline":
            known = ", ".join(c for c in group.commands if c != "pipeline")
            raise PrefcliError(f"{path}: stage {n}: unknown command '{name}'", f"commands: {known}")
        cmd = sub
    if _is_group(cmd):
        raise PrefcliError(f"{path}: stage {n}: '{name}' needs a subcommand", f"one of: {', '.join(f'{name} {c}' for c in cmd.commands)}")
    if not isinstance(table.get("options", {}), dict):
        raise PrefcliError(f"{path}: stage {n} ({name}): options must be a table", "options = { max-steps = 100 }")
    return " ".join(name.split()), cmd


def _is_group(cmd: Any) -> bool:
    return hasattr(cmd, "commands")


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _flag(cmd: Any, key: str) -> tuple[Any, str] | None:
    """The command's option called `key` (no dashes; '_' may stand for '-'), and the flag spelled out."""
    key = key.replace("_", "-")
    for p in cmd.params:
        if not _is_option(p) or p.name == "help":
            continue
        for opt in [*p.opts, *p.secondary_opts]:
            if opt.lstrip("-") == key:
                return p, opt
    return None


def _flags_of(cmd: Any) -> str:
    return ", ".join(sorted(p.opts[0].lstrip("-") for p in cmd.params if _is_option(p) and p.name != "help"))


def _apply_sets(sets: list[str], commands: list, options: list[dict], path: Path) -> None:
    """--set N.option=value (one stage) or option=value (every stage that takes it); values read as TOML."""
    for item in sets:
        target, eq, raw = item.partition("=")
        if not eq or not target:
            raise PrefcliError(f"--set {item}: expected N.option=value or option=value", "e.g. --set 2.max-steps=10")
        head, dot, key = target.partition(".")
        if dot and head.isdigit():
            stages = [int(head)]
            if not 1 <= stages[0] <= len(commands):
                raise PrefcliError(f"--set {item}: {path} has no stage {head}", f"stages are numbered 1 to {len(commands)}")
        else:
            key = target
            stages = [n for n, (name, cmd) in enumerate(commands, 1) if _flag(cmd, key) and _applies(name, cmd, options[n - 1], key)]
            if not stages:
                raise PrefcliError(f"--set {item}: no stage of {path} takes --{key}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        for n in stages:
            options[n - 1] = {k: v for k, v in options[n - 1].items() if k.replace("_", "-") != key.replace("_", "-")} | {key: value}


def _applies(name: str, cmd: Any, opts: dict, key: str) -> bool:
    """For `align`, an option applies only when the method's config has it."""
    if name != "align":
        return True
    method = next((v for k, v in opts.items() if k in ("method", "m")), None)
    try:
        cls = registry.method_config(str(method))
    except PrefcliError:
        return True  # the stage's own check reports it
    param, _ = _flag(cmd, key)
    return param.name in {f.name for f in dataclasses.fields(cls)} or param.name in registry.CLI_EXTRAS


def _argv(cmd: Any, name: str, opts: dict, args: Any) -> list[str]:
    """The options as the command's own flags: true booleans become flags, lists repeated flags."""
    argv: list[str] = []
    for key, value in opts.items():
        found = _flag(cmd, key)
        if found is None:
            raise PrefcliError(f"option '{key}' is not a flag of `prefcli {name}`", f"its flags: {_flags_of(cmd)}")
        param, opt = found
        if param.is_flag:
            if not isinstance(value, bool):
                raise PrefcliError(f"option '{key}' is a flag: give it true or false")
            if value:
                argv.append(opt)
            elif param.secondary_opts and opt in param.opts:
                argv.append(param.secondary_opts[0])  # kl = false -> --no-kl
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not param.multiple:
            raise PrefcliError(f"option '{key}' takes one value, not a list")
        for v in values:
            if isinstance(v, (bool, dict, list)):
                raise PrefcliError(f"option '{key}': {json.dumps(v)} is not a value for --{key}", "give a number or a string")
            argv += [opt, str(v)]
    if args is not None:
        if not isinstance(args, list) or not all(isinstance(a, (str, int, float)) for a in args):
            raise PrefcliError("args must be a list of strings")
        argv += [str(a) for a in args]
    return argv


def _stage(n: int, name: str, cmd: Any, table: dict, opts: dict) -> Stage:
    argv = _argv(cmd, name, opts, table.get("args"))
    try:
        ctx = cmd.make_context(name, list(argv))
    except Exception as e:  # click's usage errors (typer may vendor its own click)
        if not hasattr(e, "format_message"):
            raise
        raise PrefcliError(e.format_message(), f"see `prefcli {name} --help`") from None
    stage = Stage(n, name, argv, takes_overwrite=any(p.name == "overwrite" for p in cmd.params))
    given, untracked = _given(cmd, ctx.params)
    if name not in TRACKED or untracked:
        return stage
    cfg = registry.build(name, given, ctx.params.get("config_file"), method=ctx.params.get("method"))
    stage.outputs = _outputs(name, cfg)
    if stage.outputs is not None:
        for kind, out in stage.outputs:
            check_name(out, {"tokenizers": "--name", "datasets": "--dataset"}.get(kind, "--out"))
        stage.config = _as_recorded(cfg)
    return stage


def _given(cmd: Any, params: dict) -> tuple[dict, bool]:
    """The config options the command line would pass (its parameters are the config's fields), and
    whether it has arguments (a command with arguments is not tracked)."""
    given, untracked = {}, False
    for p in cmd.params:
        value = params.get(p.name)
        if not _is_option(p):
            untracked = untracked or bool(value)
            continue
        if p.name in registry.CLI_EXTRAS or p.name == "help" or value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = list(value) or None
        if value is not None:
            given[p.name] = str(value) if isinstance(value, Path) else value
    return given, untracked


def _outputs(name: str, cfg: Any) -> list[tuple[str, str]] | None:
    if name == "tokenize":
        return ([] if cfg.tokenizer else [("tokenizers", cfg.name)]) + [("datasets", cfg.dataset)]
    if name in ("pretrain", "align", "reward train"):
        return [("models", cfg.out)]
    if name.startswith("eval "):
        if cfg.out:
            return [("evals", cfg.out)]
        try:  # the default names evaluate.py gives
            from prefcli.stages.evaluate import slug
        except ImportError:
            return None
        if name == "eval compare":
            return [("evals", "compare-" + "-".join(slug(m) for m in cfg.model))] if cfg.model else None
        return [("evals", f"{name.split()[1]}-{slug(cfg.model)}")]
    return None


def _as_recorded(cfg: Any) -> dict:
    """The config as the stage will write it into meta.json: with the defaults the config resolves itself."""
    return json.loads(json.dumps(to_dict(resolved(cfg)), default=str))


# ---------------------------------------------------------------- deciding what to run
def _artifact_meta(ws: Workspace, kind: str, name: str) -> dict:
    path = ws.path(kind, name)
    if kind == "evals":
        return json.loads(path.read_text()).get("meta", {})
    return read_meta(path)


def _created(path: Path) -> str | None:
    try:
        if path.is_file():
            return json.loads(path.read_text()).get("meta", {}).get("created")
        return read_meta(path).get("created")
    except (OSError, ValueError, PrefcliError):
        return None


def decide(stage: Stage, ws: Workspace, rebuilt: set[Path], force: bool) -> tuple[str, str]:
    """(action, reason): run, skip, re-run or always."""
    if stage.outputs is None:
        return "always", "output not tracked"
    missing = [f"{k}/{n}" for k, n in stage.outputs if not ws.exists(k, n)]
    if len(missing) == len(stage.outputs):
        return "run", f"no {', '.join(missing)} yet"
    if force:
        return "re-run", "--force"
    if missing:
        return "re-run", f"{', '.join(missing)} missing"
    for kind, name in stage.outputs:
        where = f"{kind}/{name}"
        try:
            meta = _artifact_meta(ws, kind, name)
        except (OSError, ValueError, PrefcliError):
            return "re-run", f"{where} unreadable"
        if kind != "evals" and damaged_files(ws.path(kind, name), meta):
            return "re-run", f"{where} damaged"
        changed = _config_diff(stage.config or {}, meta.get("config"))
        if changed:
            return "re-run", f"config changed ({changed})"
        reason = _inputs_changed(meta.get("parents", []), rebuilt, ws)
        if reason:
            return "re-run", reason
    return "skip", "up to date"


def _config_diff(want: dict, have: Any) -> str:
    if not isinstance(have, dict):
        return "no config recorded"
    keys = sorted((set(want) | set(have)) - IGNORED)
    diffs = [f"{k}: {json.dumps(have.get(k))} -> {json.dumps(want.get(k))}" for k in keys if want.get(k) != have.get(k)]
    return "; ".join(diffs[:3]) + (f"; {len(diffs) - 3} more" if len(diffs) > 3 else "")


def _inputs_changed(parents: list[dict], rebuilt: set[Path], ws: Workspace | None = None) -> str:
    for p in parents:
        path = p.get("path")
        if not path:
            continue
        path = ws.parent_path(p) if ws is not None else Path(path)  # lineage is relative to the workspace root
        label = f"{p['kind']}/{p.get('name', path.name)}" if p.get("kind") in KINDS else str(path)
        if path.resolve() in rebuilt:
            return f"input rebuilt ({label})"
        if p.get("kind") in KINDS and p.get("created"):
            if not path.exists():
                return f"input missing ({label})"
            if _created(path) != p["created"]:
                return f"input rebuilt since ({label})"
        elif p.get("kind") == "input" and "size" in p:
            if not path.is_file() or path.stat().st_size != p["size"]:
                return f"input changed ({label})"
    return ""


# ---------------------------------------------------------------- running
def run(path: Path | str, workspace: Path | str | None, *, group: Any, invoke_main: Callable[[list[str]], None],
        sets: list[str] | None = None, force: bool = False, dry_run: bool = False, quiet_stdout: bool = False) -> dict:
    """Run (or with dry_run, plan) the pipeline; returns the summary, with `exit_code` of the first failure.

    group: the command line's click group (to read each stage's options as its command would);
    invoke_main: the command line's entry point, which runs each stage.
    """
    t0 = time.time()
    pipeline = load(path, sets, group)
    ws = Workspace(workspace if workspace is not None else (pipeline.workspace or default_root()))
    rebuilt: set[Path] = set()
    rows: list[dict] = []
    failed = None
    total = len(pipeline.stages)
    for stage in pipeline.stages:
        row = {"stage": stage.number, "command": stage.command, "argv": stage.argv}
        rows.append(row)
        if failed is not None:
            row.update(action="not run", reason=f"stage {failed['stage']} failed", status="not run")
            continue
        action, reason = decide(stage, ws, rebuilt, force)
        argv = list(stage.argv)
        if action in ("run", "re-run") and stage.takes_overwrite and "--overwrite" not in argv:
            argv.append("--overwrite")  # the pipeline owns its outputs (also clears a killed run's checkpoints)
        row.update(action=action, reason=reason, argv=argv)
        if action in ("run", "re-run"):
            rebuilt |= {ws.path(k, n).resolve() for k, n in stage.outputs or []}
        if dry_run:
            row["status"] = "planned"
            continue
        _header(stage, total, action, reason, argv)
        if action == "skip":
            row.update(status="skipped", seconds=0.0)
            continue
        t = time.time()
        code = invoke(invoke_main, ["-w", str(ws.root), *stage.command.split(), *argv], quiet_stdout)
        row.update(status="ok" if code == 0 else "failed", exit_code=code, seconds=round(time.time() - t, 2))
        if code != 0:
            failed = row
    result = {
        "pipeline": str(pipeline.path), "workspace": str(ws.root), "dry_run": dry_run, "force": force,
        "ok": failed is None, "stages": rows, "seconds": round(time.time() - t0, 2), "exit_code": 0,
    }
    if failed is not None:
        result["exit_code"] = failed["exit_code"]
        result["failed"] = failed["stage"]
        later = total - failed["stage"]
        _console().print(f"error: {pipeline.path}: stage {failed['stage']} ({failed['command']}) failed with exit code "
                         f"{failed['exit_code']}" + (f"; {later} later stage{'s' if later > 1 else ''} not run" if later else ""),
                         style="bold red", highlight=False, soft_wrap=True)
    return result


def invoke(main: Callable[[list[str]], None], args: list[str], quiet_stdout: bool) -> int:
    """Run `prefcli ARGS` in this process; its exit code (an unexpected exception prints its traceback: 1)."""
    redirect = contextlib.redirect_stdout(sys.stderr) if quiet_stdout else contextlib.nullcontext()
    with redirect:
        try:
            main(args)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # a runtime failure, as the shell would show it
            traceback.print_exc()
            return 1
    return 0


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _header(stage: Stage, total: int, action: str, reason: str, argv: list[str]) -> None:
    from rich.text import Text

    line = Text(f"[{stage.number}/{total}] ", style="bold")
    line.append(f"prefcli {stage.command} {shlex.join(argv)}".rstrip(), style="bold")
    line.append(f"  ({action}: {reason})", style="dim" if action == "skip" else "cyan")
    _console().print(line, highlight=False, soft_wrap=True)


def summary_table(result: dict):
    from rich.table import Table

    title = f"pipeline {result['pipeline']} " + ("(plan, nothing run)" if result["dry_run"] else f"in {result['seconds']} s")
    table = Table(title=title, title_justify="left")
    columns = ("#", "command", "plan", "why") + (() if result["dry_run"] else ("status", "seconds"))
    for col in columns:
        table.add_column(col)
    for r in result["stages"]:
        command = r["command"] + (f" --method {_method(r['argv'])}" if r["command"] == "align" else "")
        row = [str(r["stage"]), command, r.get("action", ""), r.get("reason", "")]
        if not result["dry_run"]:
            row += [r.get("status", ""), f"{r['seconds']:.1f}" if r.get("status") in ("ok", "failed") else ""]
        table.add_row(*row)
    return table


def _method(argv: list[str]) -> str:
    for i, a in enumerate(argv[:-1]):
        if a in ("--method", "-m"):
            return argv[i + 1]
    return "?"
