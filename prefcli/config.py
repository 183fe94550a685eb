"""Stage configs: dataclass defaults < a TOML file (--config) < command-line options."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from prefcli.errors import PrefcliError

T = TypeVar("T")


def read_toml(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PrefcliError(f"--config: file {path} not found", "pass the path of a TOML file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PrefcliError(f"--config: {path} is not valid TOML ({e})", "fix the file; see examples/ for the format")


def build_config(cls: type[T], config_file: Path | str | None = None, section: str | None = None, **options: Any) -> T:
    """Make `cls` from its defaults, then the TOML file, then the options that are not None.

    In the file, keys may use '-' or '_'; a table named `section` (the stage's
    name) is read too, so one file can hold several stages' settings.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file:
        doc = read_toml(config_file)
        table = {k: v for k, v in doc.items() if not isinstance(v, dict)}
        if section and isinstance(doc.get(section), dict):
            table.update(doc[section])
        for key, value in table.items():
            attr = key.replace("-", "_")
            if attr not in names:
                raise PrefcliError(
                    f"--config: {config_file}: unknown setting '{key}'",
                    f"known settings: {', '.join(sorted(n.replace('_', '-') for n in names))}",
                )
            values[attr] = value
    for key, value in options.items():
        if key not in names:
            raise TypeError(f"{cls.__name__} has no field {key}")
        if value is not None:
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
