"""The workspace: where artifacts live, how they are named, written and checked.

Layout (DESIGN.md): tokenizers/ datasets/ models/ runs/ evals/ under one root.
Every artifact folder holds a meta.json (kind, stage, config, parents, metrics,
sha256 of each file). Artifacts are built in a temporary folder inside the
workspace and renamed into place when complete, under a lock, so they exist
whole or not at all.

(Over 400 lines on purpose: naming, atomic writes, name claims, relative lineage and integrity
checks all follow the same layout rules.)
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

try:  # advisory file locks: released by the OS when the holder dies, however it dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

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


def check_output_file(path: str | Path | None, option: str) -> None:
    """Fail before any work when an output file cannot be written where it is asked for."""
    if path is None:
        return
    folder = Path(path).expanduser().absolute().parent
    if not folder.is_dir():
        raise PrefcliError(f"{option} {path}: folder {folder} does not exist", "create the folder first, or write elsewhere")
    if Path(path).is_dir():
        raise PrefcliError(f"{option} {path}: is a folder", "give the path of a file")
    if not os.access(folder, os.W_OK):
        raise PrefcliError(f"{option} {path}: folder {folder} cannot be written (permission denied)", "write elsewhere")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(folder: Path) -> dict:
    """The artifact's meta.json, or {} for a folder made elsewhere (a plain HF folder).

    A meta.json that cannot be read, is not UTF-8 JSON or is not an object is an error.
    """
    p = Path(folder) / META
    if not p.is_file():
        return {}
    try:
        meta = json.loads(p.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e).splitlines()[0]
        raise PrefcliError(f"{p}: cannot read artifact metadata ({reason})", "the artifact is damaged; rebuild it with --overwrite")
    if not isinstance(meta, dict):
        raise PrefcliError(f"{p}: artifact metadata is not a JSON object", "the artifact is damaged; rebuild it with --overwrite")
    return meta


def damaged_files(folder: Path, meta: dict | None = None, *, in_workspace: bool = False) -> list[str]:
    """Files listed in meta.json that are missing or whose sha256 no longer matches.

    Inside a workspace every artifact has a meta.json: without one (or with one that
    cannot be read) the artifact counts as damaged, and ["meta.json"] is returned.
    """
    if meta is None:
        try:
            meta = read_meta(folder)
        except PrefcliError:
            return [META]
    if in_workspace and not (Path(folder) / META).is_file():
        return [META]
    files = meta.get("files", {})
    if not isinstance(files, dict):
        return [META]
    bad = []
    for rel, digest in files.items():
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

    def holds(self, path: Path) -> bool:
        """Whether `path` is an artifact folder of this workspace (kind/name under the root)."""
        try:
            rel = Path(path).resolve().relative_to(self.root.resolve())
        except (ValueError, OSError):
            return False
        return len(rel.parts) == 2 and rel.parts[0] in KINDS

    def parent_path(self, ref: dict) -> Path | None:
        """Where a parent recorded in meta.json is now.

        New lineage holds paths relative to the workspace root, so a moved or copied
        workspace reads its own files. Old lineage holds absolute paths: when this
        workspace has an artifact of that kind and name, it is the one used, never
        the one in the workspace the path points to.
        """
        path = ref.get("path")
        if not path:
            return None
        path = Path(path)
        if not path.is_absolute():
            return self.root / path
        kind, name = ref.get("kind"), ref.get("name") or path.name
        if kind in KINDS and kind != "evals" and NAME_RE.match(name) and path.parent.name == kind:
            local = self.folder(kind) / name
            if local.exists() or not path.exists():
                return local
        return path

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
            bad = damaged_files(path, in_workspace=self.holds(path))
            if bad == [META]:
                raise PrefcliError(
                    f"{option}: artifact {path} is damaged (its meta.json is missing or unreadable)",
                    "rebuild it with --overwrite, or pass another artifact",
                )
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
        # A run being written beside an old one (runs/.<name>.new) whose writer is gone.
        runs = self.folder("runs")
        for p in runs.glob(".*.new") if runs.is_dir() else []:
            name = p.name[1:-4]
            if NAME_RE.match(name) and _claim_key(self.root, "models", name) not in _CLAIMS:
                with contextlib.suppress(PrefcliError):
                    with self.lock("models", name):
                        shutil.rmtree(p, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self, kind: str, name: str):
        """An exclusive lock on one artifact name; a second writer gets a clear error.

        A name this process has claimed (see `claim`) is already locked.
        """
        if _claim_key(self.root, kind, name) in _CLAIMS:
            yield
            return
        held = _acquire(_lock_path(self.root, kind, name), kind, name)
        try:
            yield
        finally:
            _release(held)

    def claim(self, kind: str, name: str) -> None:
        """Lock `kind/name` from now until `release_claims()` (the end of the command).

        The lock is an OS file lock: a killed holder's lock is free at once, and a lock
        file left behind (whatever pid it names) is taken over.
        """
        key = _claim_key(self.root, kind, name)
        if key in _CLAIMS:
            return
        created = self._prepare_root()
        try:
            held = _acquire(_lock_path(self.root, kind, name), kind, name)
        except BaseException:
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                (self.root / _TMP).rmdir()
            raise
        _CLAIMS[key] = Claim(self.root, kind, name, held, created)

    def begin_run(self, name: str, *, resume: bool, overwrite: bool, config: dict | None = None) -> Path:
        """Claim `name` (model and run) and pick the run folder this command trains in.

        - --resume: runs/<name>, checked against the options it was started with, and
          an existing models/<name> must be this run's own earlier output.
        - a new run where runs/<name> exists (--overwrite, or an earlier run with no
          checkpoint): a hidden runs/.<name>.new, swapped into place by `finish_run`
          once the model is saved, so the old run stays until the new one is complete.
        - otherwise runs/<name>, made now; removed again if the command fails before
          its first checkpoint.
        """
        self.claim("models", name)
        claim = _CLAIMS[_claim_key(self.root, "models", name)]
        final, temp = self.folder("runs") / name, self.folder("runs") / f".{name}.new"
        if resume:
            if not run_checkpoints(final):
                raise PrefcliError(f"--resume: {final} has no checkpoint to resume from", "run without --resume to start a new run")
            record = read_run_record(final)
            if config is not None and record.get("config") is not None:
                check_resume_options(record["config"], config, final)
            model = self.folder("models") / name
            if model.exists() and not overwrite:
                try:
                    model_run = read_meta(model).get("run_id")
                except PrefcliError:
                    model_run = None
                if not record.get("run_id") or model_run != record.get("run_id"):
                    raise PrefcliError(
                        f"--resume: model '{name}' at {model} was not written by the run {final}",
                        "pass --overwrite to replace it when the run ends, or resume under another --out name",
                    )
            claim.run_dir = final
            return final
        if final.exists():
            if run_checkpoints(final) and not overwrite:
                raise PrefcliError(
                    f"{final} holds checkpoints of an earlier run of '{name}'",
                    "pass --resume to continue it, or --overwrite to start again",
                )
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir()
            claim.run_dir, claim.replaces = temp, final
        else:
            if not self.folder("runs").exists():
                claim.created.append(self.folder("runs"))
            final.mkdir(parents=True)
            claim.run_dir, claim.created_run = final, True
        write_json_atomic(claim.run_dir / RUN_RECORD, {"run_id": uuid.uuid4().hex, "started": _now(), "config": config})
        return claim.run_dir

    def run_record(self, name: str) -> dict:
        """{"run_id": ...} of the run this command trains `name` in (for the model's meta.json)."""
        claim = _CLAIMS.get(_claim_key(self.root, "models", name))
        run_dir = claim.run_dir if claim and claim.run_dir else self.folder("runs") / name
        run_id = read_run_record(run_dir).get("run_id")
        return {"run_id": run_id} if run_id else {}

    def finish_run(self, name: str) -> None:
        """The model `name` is saved: put its new run folder in place of the old one."""
        claim = _CLAIMS.get(_claim_key(self.root, "models", name))
        if claim is None or claim.done:
            return
        if claim.replaces is not None and claim.run_dir is not None and claim.run_dir.exists():
            _replace_dir(claim.run_dir, claim.replaces)
            claim.run_dir, claim.replaces = claim.replaces, None
        claim.done = True

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
                    meta = _eval_meta(p)
                    rows.append(_row(kind, p.stem, p, meta, p.stat().st_size, [] if meta else [p.name]))
                    continue
                if not p.is_dir():
                    continue
                try:
                    meta = read_meta(p)
                except PrefcliError:
                    meta = {}
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                rows.append(_row(kind, p.name, p, meta, size, damaged_files(p, in_workspace=kind != "runs")))
        return rows

    def find(self, name: str) -> list[dict]:
        """Artifacts called `name`; a run folder counts only when nothing else has the name."""
        rows = [r for r in self.artifacts() if r["name"] == name]
        return [r for r in rows if r["kind"] != "runs"] or rows

    def lineage(self, kind: str, name: str, _seen=None) -> dict:
        """The artifact and its parents, recursively, back to the raw inputs."""
        _seen = set() if _seen is None else _seen
        path = self.folder(kind) / (f"{name}.json" if kind == "evals" else name)
        try:
            meta = read_meta(path) if kind != "evals" else _eval_meta(path)
        except PrefcliError:
            meta = {}
        node = {"kind": kind, "name": name, "created": meta.get("created"), "stage": meta.get("stage"), "parents": []}
        if (kind, name) in _seen:
            return node
        _seen.add((kind, name))
        for parent in _parents(meta):
            pk, pn = parent.get("kind"), parent.get("name")
            if pk in KINDS and pn and (self.folder(pk) / pn).exists():
                node["parents"].append(self.lineage(pk, pn, _seen))
            else:
                node["parents"].append({k: v for k, v in parent.items()} | {"parents": []})
        return node


def _eval_meta(path: Path) -> dict:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return {}
    meta = doc.get("meta", {}) if isinstance(doc, dict) else {}
    return meta if isinstance(meta, dict) else {}


def _parents(meta: dict) -> list[dict]:
    parents = meta.get("parents", [])
    return [p for p in parents if isinstance(p, dict)] if isinstance(parents, list) else []


def _row(kind: str, name: str, path: Path, meta: dict, size: int, damaged: list[str]) -> dict:
    return {
        "kind": kind,
        "name": name,
        "type": meta.get("kind", _SINGULAR[kind]),
        "path": str(path),
        "created": meta.get("created"),
        "stage": meta.get("stage"),
        "parents": [str(p.get("name") or Path(str(p.get("path", "?"))).name) for p in _parents(meta)],
        "size": size,
        "metrics": meta.get("metrics", {}) if isinstance(meta.get("metrics"), dict) else {},
        "damaged": damaged,
    }


def parent_ref(kind: str, path: Path) -> dict:
    """How an input artifact is recorded in a child's meta.json (lineage).

    An artifact of a workspace (<root>/<kind>/<name>) is recorded by its path relative
    to the root, so the workspace can be moved or copied; with the sha256 of its
    meta.json, which names the sha256 of every file it holds. A folder from elsewhere
    keeps its absolute path.
    """
    path = Path(path)
    meta = read_meta(path) if path.is_dir() else {}
    in_workspace = path.parent.name == kind and kind in KINDS
    where = f"{kind}/{path.name}" if in_workspace else str(path.resolve())
    ref = {"kind": kind, "name": meta.get("name", path.name), "path": where}
    if meta.get("created"):
        ref["created"] = meta["created"]
    if (path / META).is_file():
        ref["sha256"] = sha256_file(path / META)
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


# ---- claims: names locked for a whole command -----------------------------------------

RUN_RECORD = "run.json"  # in a run folder: its id, start time and the options it was started with
# Options that may differ on --resume: they change how long the run goes, how often it
# writes, or where it runs, but not what any step computes.
RESUME_MAY_CHANGE = ("max_steps", "epochs", "tokens", "eval_every", "save_every", "device", "compile", "threads",
                     "resume", "overwrite", "sample_tokens", "log_every", "keep_checkpoints", "json", "fsdp")


@dataclass
class Claim:
    """A name this process holds from `Workspace.claim` to `release_claims`."""

    root: Path
    kind: str
    name: str
    held: tuple
    created: list[Path]  # folders made for it (removed again when the command fails)
    run_dir: Path | None = None
    replaces: Path | None = None  # the old run folder that run_dir takes the place of on success
    created_run: bool = False
    done: bool = False


_CLAIMS: dict[tuple, Claim] = {}


def _claim_key(root: Path, kind: str, name: str) -> tuple:
    return (str(Path(root).absolute()), kind, name)


def _lock_path(root: Path, kind: str, name: str) -> Path:
    return Path(root) / _LOCKS / f"{kind}-{name}.lock"


def _busy(kind: str, name: str, pid: str) -> PrefcliError:
    who = f" (pid {pid})" if pid else ""
    return PrefcliError(
        f"{_SINGULAR[kind]} '{name}' is being written by another prefcli process{who}",
        "wait for it to finish, or pass another --out name",
    )


def _acquire(path: Path, kind: str, name: str) -> tuple:
    """Lock `path` for this process or raise naming the holder's pid. Returns what `_release` needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - no flock: a pid file, stale when its pid is gone
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid = path.read_text().strip()
            if pid.isdigit() and _pid_alive(int(pid)):
                raise _busy(kind, name, pid) from None
            path.unlink(missing_ok=True)
            return _acquire(path, kind, name)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return (path, None)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            raise _busy(kind, name, pid if pid.isdigit() else "") from None
        # Its last holder may have removed the file between our open and flock: lock the one in place.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return (path, fd)


def _release(held: tuple) -> None:
    path, fd = held
    with contextlib.suppress(OSError):
        path.unlink()
    if fd is not None:
        os.close(fd)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # .locks, when empty


def release_claims(ok: bool) -> list[Path]:
    """End of a command: unlock every claimed name. When the command failed, undo what it
    made (a new run folder with no checkpoint, a run being written beside an old one).

    Returns the run folders a failed command leaves to --resume from.
    """
    resumable = []
    for key in reversed(list(_CLAIMS)):
        claim = _CLAIMS.pop(key)
        if not ok and not claim.done and claim.run_dir is not None:
            if claim.replaces is not None or (claim.created_run and not run_checkpoints(claim.run_dir)):
                shutil.rmtree(claim.run_dir, ignore_errors=True)
            elif run_checkpoints(claim.run_dir):
                resumable.append(claim.run_dir)
        _release(claim.held)
        if not ok:
            for d in reversed(claim.created):
                with contextlib.suppress(OSError):
                    d.rmdir()
        with contextlib.suppress(OSError):
            (claim.root / _TMP).rmdir()
    return resumable


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (with a state.json) in a run folder, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("step-*") if (p / "state.json").is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_run_record(run_dir: Path) -> dict:
    try:
        doc = json.loads((Path(run_dir) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_json_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def check_resume_options(started: dict, now: dict, run_dir: Path) -> None:
    """Refuse a resume whose options differ from those the run was started with."""
    def norm(v):
        return json.loads(json.dumps(v, default=str))

    now = norm(now)
    changed = [k for k in sorted(set(started) | set(now))
               if k not in RESUME_MAY_CHANGE and started.get(k) != now.get(k)]
    if changed:
        parts = [f"--{k.replace('_', '-')} {json.dumps(now.get(k))} (was {json.dumps(started.get(k))})" for k in changed]
        raise PrefcliError(
            f"--resume: {run_dir} was started with other options: {', '.join(parts)}",
            "resume with the options it was started with; only "
            + ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_MAY_CHANGE[:8])
            + " may change (or start again with --overwrite)",
        )
