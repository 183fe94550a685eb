"""The workspace: where artifacts live, how they are named, written and checked.

Layout (DESIGN.md): tokenizers/ datasets/ models/ runs/ evals/ under one root.
Every artifact folder holds a meta.json (kind, stage, config, parents, metrics,
sha256 of each file). Artifacts are built in a temporary folder inside the
workspace and renamed into place when complete, under a lock, so they exist
whole or not at all.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from prefcli import __version__
from prefcli.errors import PrefcliError

KINDS = ("tokenizers", "datasets", "models", "runs", "evals")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
META = "meta.json"
_TMP, _LOCKS = ".tmp", ".locks"
# Which singular kind each folder holds, for messages.
_SINGULAR = {"tokenizers": "tokenizer", "datasets": "dataset", "models": "model", "runs": "run", "evals": "eval"}
# The command that makes each default artifact, for hints.
_MAKER = {"tokenizers": "prefcli tokenize", "datasets": "prefcli tokenize", "models": "prefcli pretrain|align|reward train"}


def default_root() -> Path:
    return Path(os.environ.get("PREFCLI_WORKSPACE") or "workspace")


def check_name(name: str, option: str = "--out") -> str:
    """An artifact name is `[a-z0-9][a-z0-9._-]*` and never climbs out of its folder."""
    if not NAME_RE.match(name or "") or ".." in name:
        raise PrefcliError(
            f"{option}: '{name}' is not a valid artifact name",
            "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit (no '/' or '..')",
        )
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(folder: Path) -> dict:
    """The artifact's meta.json, or {} for a folder made elsewhere (a plain HF folder)."""
    p = Path(folder) / META
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrefcliError(f"{p}: cannot read artifact metadata ({e})", "the artifact is damaged; rebuild it with --overwrite")


def damaged_files(folder: Path, meta: dict | None = None) -> list[str]:
    """Files listed in meta.json that are missing or whose sha256 no longer matches."""
    meta = read_meta(folder) if meta is None else meta
    bad = []
    for rel, digest in meta.get("files", {}).items():
        f = Path(folder) / rel
        if not f.is_file() or sha256_file(f) != digest:
            bad.append(rel)
    return bad


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Artifact:
    """An artifact being written: put files in `path`, fill `meta`; the writer seals it."""

    kind: str
    name: str
    path: Path
    meta: dict = field(default_factory=dict)


class Workspace:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()

    # ---- naming and lookup -------------------------------------------------
    def folder(self, kind: str) -> Path:
        assert kind in KINDS, kind
        return self.root / kind

    def path(self, kind: str, name: str) -> Path:
        check_name(name)
        return self.folder(kind) / (f"{name}.json" if kind == "evals" else name)

    def exists(self, kind: str, name: str) -> bool:
        return self.path(kind, name).exists()

    def resolve(self, kind: str, ref: str | Path, option: str = "--model", verify: bool = True) -> Path:
        """A name is looked up in its kind's folder; anything with a '/' is a path used as it is.

        Raises a PrefcliError naming the option when it is missing, or damaged.
        """
        ref_s = str(ref)
        if "/" in ref_s or os.sep in ref_s or not NAME_RE.match(ref_s):
            path = Path(ref_s).expanduser()
            if not path.exists():
                raise PrefcliError(f"{option}: '{ref_s}' does not exist", "pass an artifact name or an existing folder")
        else:
            path = self.folder(kind) / ref_s
            if not path.exists():
                maker = _MAKER.get(kind)
                hint = f"make it with `{maker}`, " if maker else ""
                raise PrefcliError(
                    f"{option}: no {_SINGULAR[kind]} named '{ref_s}' in {self.folder(kind)}",
                    f"{hint}pass another name (see `prefcli ls`) or a path to a folder",
                )
        if verify and path.is_dir():
            bad = damaged_files(path)
            if bad:
                raise PrefcliError(
                    f"{option}: artifact {path} is damaged ({', '.join(bad[:3])} changed or missing since it was written)",
                    "rebuild it with --overwrite, or pass another artifact",
                )
        return path

    # ---- writing -----------------------------------------------------------
    def _prepare_root(self) -> list[Path]:
        """Create the folders a write needs; return those that did not exist (to undo on failure)."""
        created = []
        for d in (self.root, self.root / _TMP, self.root / _LOCKS):
            if not d.exists():
                try:
                    d.mkdir(parents=True)
                except OSError as e:
                    raise PrefcliError(
                        f"workspace {self.root} cannot be written ({e.strerror})",
                        "pass --workspace DIR with a folder you can write to, or set PREFCLI_WORKSPACE",
                    )
                created.append(d)
        if not os.access(self.root, os.W_OK) or not os.access(self.root / _TMP, os.W_OK):
            raise PrefcliError(
                f"workspace {self.root} cannot be written (permission denied)",
                "pass --workspace DIR with a folder you can write to, or set PREFCLI_WORKSPACE",
            )
        self._sweep_stale()
        return created

    def _sweep_stale(self) -> None:
        """Remove temporary folders and locks left by processes that were killed."""
        for d in (self.root / _TMP, self.root / _LOCKS):
            if not d.is_dir():
                continue
            for p in d.iterdir():
                m = re.search(r"\.pid(\d+)", p.name)
                if m and not _pid_alive(int(m.group(1))):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, kind: str, name: str):
        """An exclusive lock on one artifact name; a second writer gets a clear error."""
        lock_dir = self.root / _LOCKS
        lock_dir.mkdir(parents=True, exist_ok=True)
        for stale in lock_dir.glob(f"{kind}-{name}.pid*"):
            pid = int(stale.name.rsplit(".pid", 1)[1])
            if _pid_alive(pid) and pid != os.getpid():
                raise PrefcliError(
                    f"{_SINGULAR[kind]} '{name}' is being written by another prefcli process (pid {pid})",
                    "wait for it to finish, or pass another --out name",
                )
            stale.unlink(missing_ok=True)
        mine = lock_dir / f"{kind}-{name}.pid{os.getpid()}"
        mine.touch()
        # Two processes can pass the check at once: the one whose lock file sorts
        # first wins, the other backs off.
        holders = sorted(lock_dir.glob(f"{kind}-{name}.pid*"))
        if holders and holders[0] != mine:
            mine.unlink(missing_ok=True)
            raise PrefcliError(
                f"{_SINGULAR[kind]} '{name}' is being written by another prefcli process",
                "wait for it to finish, or pass another --out name",
            )
        try:
            yield
        finally:
            mine.unlink(missing_ok=True)

    def check_root_writable(self) -> None:
        """Fail early when the workspace (or the folder it would be made in) cannot be written."""
        p = self.root.absolute()
        while not p.exists():
            p = p.parent
        if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
            reason = "not a folder" if not p.is_dir() else "permission denied"
            raise PrefcliError(
                f"workspace {self.root} cannot be written ({p} is {reason})" if p != self.root.absolute()
                else f"workspace {self.root} cannot be written ({reason})",
                "pass --workspace DIR with a folder you can write to, or set PREFCLI_WORKSPACE",
            )

    def check_writable(self, kind: str, name: str, overwrite: bool, option: str = "--out") -> Path:
        """Fail early (before any work) when `name` is taken and --overwrite was not given."""
        check_name(name, option)
        self.check_root_writable()
        final = self.path(kind, name)
        if final.exists() and not overwrite:
            raise PrefcliError(
                f"{_SINGULAR[kind]} '{name}' already exists at {final}",
                f"pass --overwrite to replace it, or {option} NEW_NAME",
            )
        return final

    @contextlib.contextmanager
    def _writing(self, kind: str, name: str):
        """Hold the name's lock while an artifact is written; on failure undo the folders made for it."""
        created = self._prepare_root()
        kind_dir_created = not self.folder(kind).exists()
        try:
            with self.lock(kind, name):
                yield
        except BaseException:
            if kind_dir_created and self.folder(kind).exists() and not any(self.folder(kind).iterdir()):
                self.folder(kind).rmdir()
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        finally:
            # Keep the root tidy: helper folders are removed when empty.
            for d in (self.root / _TMP, self.root / _LOCKS):
                with contextlib.suppress(OSError):
                    d.rmdir()

    @contextlib.contextmanager
    def create(self, kind: str, name: str, *, stage: str, config: dict, parents: list[dict] = (),
               overwrite: bool = False, meta_kind: str | None = None):
        """Write an artifact atomically.

        Yields an `Artifact` whose `path` is a temporary folder; on a clean exit
        meta.json is written (with the sha256 of every file) and the folder is
        renamed into place. On any exception, Ctrl-C included, the temporary
        folder is removed and the workspace is left as it was.
        """
        final = self.check_writable(kind, name, overwrite)
        with self._writing(kind, name):
            tmp = self.root / _TMP / f"{kind}-{name}-{uuid.uuid4().hex[:8]}.pid{os.getpid()}"
            tmp.mkdir()
            art = Artifact(kind, name, tmp, {
                "kind": meta_kind or _SINGULAR[kind],
                "name": name,
                "prefcli_version": __version__,
                "created": _now(),
                "stage": stage,
                "config": config,
                "parents": list(parents),
                "metrics": {},
            })
            try:
                yield art
                art.meta["files"] = {
                    str(p.relative_to(tmp)): sha256_file(p)
                    for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != META
                }
                (tmp / META).write_text(json.dumps(art.meta, indent=2, default=str) + "\n")
                self.folder(kind).mkdir(parents=True, exist_ok=True)
                _replace_dir(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def write_json(self, kind: str, name: str, doc: dict, *, overwrite: bool = False) -> Path:
        """Write a one-file JSON artifact (evals/<name>.json) atomically."""
        final = self.check_writable(kind, name, overwrite)
        with self._writing(kind, name):
            self.folder(kind).mkdir(parents=True, exist_ok=True)
            tmp = self.root / _TMP / f"{kind}-{name}.json.pid{os.getpid()}"
            tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            os.replace(tmp, final)
        return final

    # ---- listing -----------------------------------------------------------
    def artifacts(self) -> list[dict]:
        """Every artifact: kind, name, path, created, parents, size, metrics, damaged."""
        rows = []
        for kind in KINDS:
            d = self.folder(kind)
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                if p.name.startswith("."):
                    continue
                if kind == "evals":
                    if p.suffix != ".json":
                        continue
                    try:
                        doc = json.loads(p.read_text())
                    except (OSError, json.JSONDecodeError):
                        doc = {}
                    meta = doc.get("meta", {})
                    rows.append(_row(kind, p.stem, p, meta, p.stat().st_size, []))
                    continue
                if not p.is_dir():
                    continue
                try:
                    meta = read_meta(p)
                except PrefcliError:
                    meta = {"files": {"meta.json": "unreadable"}}
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                rows.append(_row(kind, p.name, p, meta, size, damaged_files(p, meta) if meta else []))
        return rows

    def find(self, name: str) -> list[dict]:
        """Artifacts called `name`; a run folder counts only when nothing else has the name."""
        rows = [r for r in self.artifacts() if r["name"] == name]
        return [r for r in rows if r["kind"] != "runs"] or rows

    def lineage(self, kind: str, name: str, _seen=None) -> dict:
        """The artifact and its parents, recursively, back to the raw inputs."""
        _seen = set() if _seen is None else _seen
        path = self.folder(kind) / (f"{name}.json" if kind == "evals" else name)
        meta = read_meta(path) if kind != "evals" else _eval_meta(path)
        node = {"kind": kind, "name": name, "created": meta.get("created"), "stage": meta.get("stage"), "parents": []}
        if (kind, name) in _seen:
            return node
        _seen.add((kind, name))
        for parent in meta.get("parents", []):
            pk, pn = parent.get("kind"), parent.get("name")
            if pk in KINDS and pn and (self.folder(pk) / pn).exists():
                node["parents"].append(self.lineage(pk, pn, _seen))
            else:
                node["parents"].append({k: v for k, v in parent.items()} | {"parents": []})
        return node


def _eval_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text()).get("meta", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _row(kind: str, name: str, path: Path, meta: dict, size: int, damaged: list[str]) -> dict:
    return {
        "kind": kind,
        "name": name,
        "type": meta.get("kind", _SINGULAR[kind]),
        "path": str(path),
        "created": meta.get("created"),
        "stage": meta.get("stage"),
        "parents": [p.get("name") or Path(p.get("path", "?")).name for p in meta.get("parents", [])],
        "size": size,
        "metrics": meta.get("metrics", {}),
        "damaged": damaged,
    }


def parent_ref(kind: str, path: Path) -> dict:
    """How an input artifact is recorded in a child's meta.json (lineage)."""
    path = Path(path)
    meta = read_meta(path) if path.is_dir() else {}
    ref = {"kind": kind, "name": meta.get("name", path.name), "path": str(path.resolve())}
    if meta.get("created"):
        ref["created"] = meta["created"]
    return ref


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst is moved aside first and removed only after."""
    if dst.exists():
        aside = dst.parent / f".{dst.name}.old.pid{os.getpid()}"
        os.replace(dst, aside)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(aside, dst)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)
