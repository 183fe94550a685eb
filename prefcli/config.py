"""Stage configs: dataclass defaults < a TOML file (--config) < command-line options.

A config field declared with `option(...)` carries what the command line needs to
show and check it: help text, flag, choices, numeric range, help panel. The CLI is
generated from these fields (prefcli/cli.py); the same checks apply to values from a
TOML file, where errors name the file, table and key instead of the flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from prefcli.errors import PrefcliError

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str | None = None, *, factory: Any = _MISSING, flag: str | None = None,
           short: str | None = None, choices: Iterable[str] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, panel: str | None = None,
           default_text: str | None = None, metavar: str | None = None) -> Any:
    """A config field with its command-line description.

    help: the option's help (a field without help is settable from TOML only);
    flag/short: the flag when it is not --field-name (e.g. "--no-pack"), and a short one;
    choices: the closed set of values (checked, and listed in --help);
    ge/gt/le/lt: the numeric range (floats must also be finite);
    default_text: what --help shows as the default when the value alone says too little
    (None meaning "per method", say); panel: the help panel of `align`.
    """
    meta = {k: v for k, v in dict(help=help, flag=flag, short=short, choices=tuple(choices) if choices else None,
                                  ge=ge, gt=gt, le=le, lt=lt, panel=panel, default_text=default_text,
                                  metavar=metavar).items() if v is not None}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------- describing fields
def config_fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def field_meta(cls: type, name: str) -> dict:
    """A field's metadata, with what a base class declared for it (a subclass that only
    changes a default, `lr: float = 3e-4`, keeps the base's help and range)."""
    meta: dict = {}
    for klass in reversed(cls.__mro__):
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None:
            meta.update(f.metadata)
    return meta


def flag_of(cls: type, name: str) -> str:
    """The long flag of a config field as the user types it."""
    return field_meta(cls, name).get("flag") or "--" + name.replace("_", "-")


def field_type(cls: type, name: str) -> tuple[type, bool]:
    """(base type, is a list) of a field: int, float, str, bool or Path; Optional unwrapped."""
    tp = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return (args[0] if args else str), True
    if args and origin is not None and origin not in (list, tuple):  # Optional[X] / X | None
        inner = args[0]
        if typing.get_origin(inner) in (list, tuple):
            return (typing.get_args(inner) or (str,))[0], True
        return inner, False
    return tp, False


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def range_text(meta: dict) -> str | None:
    """The field's numeric range in words, e.g. 'in [0, 1)', '> 0', 'at least 1'."""
    lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        if lo[0] == "(":
            return f"> {lo[1]:g}"
        return "at least 1" if lo[1] == 1 else f">= {lo[1]:g}"
    if hi:
        return f"<= {hi[1]:g}" if hi[0] == "]" else f"< {hi[1]:g}"
    return None


def check_value(meta: dict, value: Any, where: str) -> None:
    """Refuse a value outside a field's choices or range; `where` names it (a flag, or FILE: [table] key)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is None:
            continue
        choices = meta.get("choices")
        if choices and v not in choices:
            raise PrefcliError(f"{where} {v}: not one of {', '.join(choices)}", f"choose one of {', '.join(choices)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        bad = isinstance(v, float) and not math.isfinite(v)
        bad = bad or ("ge" in meta and v < meta["ge"]) or ("gt" in meta and v <= meta["gt"])
        bad = bad or ("le" in meta and v > meta["le"]) or ("lt" in meta and v >= meta["lt"])
        if bad:
            rng = range_text(meta)
            if isinstance(v, float) and not math.isfinite(v):
                raise PrefcliError(f"{where} {v}: must be a finite number" + (f" {rng}" if rng else ""))
            raise PrefcliError(f"{where} {v}: must be {rng}")


# ---------------------------------------------------------------- TOML
def read_toml(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PrefcliError(f"--config: file {path} not found", "pass the path of a TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PrefcliError(f"--config: {path} is not valid TOML ({e})", "fix the file; see examples/ for the format")


_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", Path: "a string (a path)"}


def _toml_value(cls: type, f: dataclasses.Field, value: Any, where: str) -> Any:
    """A TOML value converted to the field's type, or a one-line error naming the key and the type wanted."""
    base, is_list = field_type(cls, f.name)
    want = _TYPE_WORDS.get(base, base.__name__)
    if is_list:
        items = value if isinstance(value, list) else [value]  # one value is a list of one
        want = f"a list of {want.replace('a ', '', 1)}s" if base is not Path else "a list of strings (paths)"
        return [_scalar(base, v, where, want) for v in items]
    return _scalar(base, value, where, want)


def _scalar(base: type, v: Any, where: str, want: str) -> Any:
    ok = {bool: isinstance(v, bool),
          int: isinstance(v, int) and not isinstance(v, bool),
          float: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: isinstance(v, str), Path: isinstance(v, str)}.get(base, True)
    if not ok:
        shown = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
        raise PrefcliError(f"{where}: expected {want}, got {shown}", "fix the value in the file")
    if base is float:
        return float(v)
    if base is Path:
        return Path(v)
    return v


def _suggest(word: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def build_config(cls: type[T], config_file: Path | str | None = None, section: str | None = None,
                 sections: Iterable[str] | None = None, **options: Any) -> T:
    """Make `cls` from its defaults, then the TOML file, then the options that are not None.

    In the file, keys may use '-' or '_'; top-level keys apply to every command, and a
    table named `section` (the command's name) to this one, so one file can hold several
    commands' settings. `sections` lists every table a file may hold: any other table
    (a misspelt `[pretrian]`) is refused, as are unknown keys and values of the wrong type.
    Every value, from the file or the options, is checked against the field's range.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        doc = read_toml(config_file)
        known_tables = set(sections or ()) | ({section} if section else set())
        for key, value in doc.items():
            if isinstance(value, dict) and key not in known_tables:
                raise PrefcliError(f"--config: {config_file}: unknown table [{key}]",
                                   f"{_suggest(key, known_tables)}tables are: {', '.join(f'[{t}]' for t in sorted(known_tables))}")
        table = [(k, v, k) for k, v in doc.items() if not isinstance(v, dict)]
        if section and isinstance(doc.get(section), dict):
            table += [(k, v, f"[{section}] {k}") for k, v in doc[section].items()]
        for key, value, where in table:
            attr = key.replace("-", "_")
            if attr not in fields:
                names = sorted(n.replace("_", "-") for n in fields)
                raise PrefcliError(f"--config: {config_file}: unknown setting '{where}'",
                                   f"{_suggest(key.replace('_', '-'), names)}known settings: {', '.join(names)}")
            place = f"--config: {config_file}: {where}"
            values[attr] = _toml_value(cls, fields[attr], value, place)
            check_value(field_meta(cls, attr), values[attr], place + " =")
    for key, value in options.items():
        if key not in fields:
            raise TypeError(f"{cls.__name__} has no field {key}")
        if value is not None:
            check_value(field_meta(cls, key), value, flag_of(cls, key))
            values[key] = value
    try:
        return cls(**values)
    except TypeError as e:
        raise PrefcliError(f"--config: {e}", "check the settings in the file")


def to_dict(cfg: Any) -> dict:
    """A JSON-friendly dict of a config dataclass (paths as strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, (list, tuple)):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        out[f.name] = v
    return out


def resolved(cfg: T) -> T:
    """The config with the defaults it fills in at run time (its own `resolved()`, when it has one)."""
    fn = getattr(cfg, "resolved", None)
    return fn() if callable(fn) else cfg
