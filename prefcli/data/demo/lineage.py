"""Whether an artifact descends from the built-in demo data: the demo is a default only for those.

A model made from the user's own corpus and data has no business being trained or judged
on the demo's Millbrook prompts; a stage that needs prompts and got none says so instead.
"""

from __future__ import annotations

from pathlib import Path

from prefcli.errors import PrefcliError


def _demo_input(parent: dict) -> bool:
    """A lineage record of built-in demo data ("demo corpus (built-in, seed 0)", kind "demo", ...)."""
    return parent.get("kind") == "demo" or (parent.get("kind") == "input" and str(parent.get("name", "")).startswith("demo"))


def descends_from_demo(meta_or_folder: dict | str | Path, _seen: set | None = None, root: Path | None = None) -> bool:
    """True when the artifact's meta.json, or an ancestor's (followed by path), records demo data as an input.

    A folder made elsewhere (no meta.json, e.g. an HF model) does not descend from the demo.
    Lineage paths are relative to the workspace root (a folder's <root>/<kind>/<name>) or absolute.
    """
    from prefcli.workspace import read_meta

    seen = set() if _seen is None else _seen
    folder = None if isinstance(meta_or_folder, dict) else Path(meta_or_folder)
    if root is None and folder is not None:
        root = folder.resolve().parent.parent
    meta = meta_or_folder if folder is None else read_meta(folder)
    for parent in meta.get("parents", []):
        if _demo_input(parent):
            return True
        path = parent.get("path")
        if not path or parent.get("kind") == "input":
            continue
        where = Path(path) if Path(path).is_absolute() or root is None else root / path
        if str(where) not in seen and where.is_dir():
            seen.add(str(where))
            if descends_from_demo(where, seen):
                return True
    return False


def require_prompts_unless_demo(models: dict, option: str = "--prompts", what: str = "prompts") -> None:
    """Exit 2 naming --prompts when none were given and some model is not of demo lineage.

    models: {name: meta dict or folder}.
    """
    foreign = [name for name, m in models.items() if not descends_from_demo(m)]
    if foreign:
        raise PrefcliError(
            f"{option}: no {what} given, and {', '.join(foreign)} was not made from the built-in demo data",
            f"pass {option} FILE with your own prompt rows (the demo prompts only suit demo models)",
        )
