"""Readers for user data: .txt, .jsonl, .json, .parquet and .arrow; files, folders, globs and
folders written by `datasets.save_to_disk`.

Every record carries where it came from, so a bad row is reported by file and
line. Text is streamed: memory stays bounded however large the input.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator

from prefcli.errors import PrefcliError

SUPPORTED = (".txt", ".jsonl", ".json", ".parquet", ".arrow")


def expand_inputs(specs: list[str | Path], option: str = "--input") -> list[Path]:
    """Files, folders (searched recursively for supported files) and globs, in a stable order."""
    files: list[Path] = []
    for spec in specs:
        spec_s = str(spec)
        if any(c in spec_s for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(spec_s, recursive=True))
            if not matches:
                raise PrefcliError(f"{option}: no file matches '{spec_s}'", "check the pattern")
            files += [m for m in matches if m.is_file()]
            continue
        path = Path(spec_s).expanduser()
        if path.is_dir() and is_datasets_folder(path):
            files.append(path)
            continue
        check_not_a_hub_name(spec_s, path, option)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED and p.name not in DATASETS_META)
            if not found:
                raise PrefcliError(f"{option}: folder {path} has no {', '.join(SUPPORTED)} files", "pass files of a supported kind")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PrefcliError(f"{option}: input file {path} not found", "check the path")
    for f in files:
        if f.suffix not in SUPPORTED and not f.is_dir():
            raise PrefcliError(f"{option}: {f} is not a supported file", f"use one of {', '.join(SUPPORTED)}")
    return files


def iter_txt_documents(path: Path) -> Iterator[str]:
    """A .txt file is split into documents at blank lines (one or more empty lines)."""
    lines: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, path, lineno)
            if line.strip():
                lines.append(line.rstrip("\r\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each row of a .jsonl, .json (a list, or {"data": [...]}) or .parquet file,
    an .arrow shard or a datasets folder."""
    if path.is_dir() or path.suffix == ".arrow":
        yield from iter_datasets_records(path)
    elif path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _utf8(raw, path, lineno)  # a bad byte is named by line, not replaced
                if not line.strip():
                    continue
                try:
                    rec = _json_loads(line)
                except json.JSONDecodeError as e:
                    raise PrefcliError(f"{path}:{lineno}: not valid JSON ({e.msg})", "each line must be one JSON object")
                except _NotFinite as e:
                    raise PrefcliError(f"{path}:{lineno}: {e} is not a finite number", "numbers in the data must be finite")
                if not isinstance(rec, dict):
                    raise PrefcliError(f"{path}:{lineno}: expected a JSON object", "each line must be one JSON object")
                yield lineno, rec
    elif path.suffix == ".json":
        raw = path.read_bytes()
        try:
            doc = _json_loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            lineno = raw.count(b"\n", 0, e.start) + 1
            offset = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
            raise PrefcliError(f"{path}:{lineno}:{offset}: not valid UTF-8 (byte 0x{raw[e.start]:02x})", "save the file as UTF-8")
        except json.JSONDecodeError as e:
            raise PrefcliError(f"{path}:{e.lineno}: not valid JSON ({e.msg})", "fix the file")
        except _NotFinite as e:
            raise PrefcliError(f"{path}: {e} is not a finite number", "numbers in the data must be finite")
        rows = doc.get("data") if isinstance(doc, dict) else doc
        if not isinstance(rows, list):
            raise PrefcliError(f"{path}: expected a list of objects (or {{\"data\": [...]}})", "fix the file")
        for i, rec in enumerate(rows, 1):
            if not isinstance(rec, dict):
                raise PrefcliError(f"{path}: item {i} is not a JSON object", "each item must be an object")
            yield i, rec
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PrefcliError(f"{path}: reading parquet needs pyarrow", "pip install 'prefcli[parquet]'")
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    else:
        raise PrefcliError(f"{path}: unsupported file type", f"use one of {', '.join(SUPPORTED)}")


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Documents from text files (split at blank lines) and records' `text_field`."""
    for path in files:
        if path.suffix == ".txt":
            yield from iter_txt_documents(path)
            continue
        for lineno, rec in iter_records(path):
            text = rec.get(text_field)
            if not isinstance(text, str):
                where = f"{path}:{lineno}" if path.suffix == ".jsonl" else f"{path}: row {lineno}"
                raise PrefcliError(
                    f"{where}: no string field '{text_field}'",
                    "pass --text-field with the name of the field that holds the text",
                )
            if text.strip():
                yield text


def read_rows(specs: list[str | Path], required: tuple[str, ...] = (), option: str = "--data") -> list[dict]:
    """All records of structured files, each checked for the `required` fields (file and line on error)."""
    rows = []
    for path in expand_inputs(specs, option):
        if path.suffix == ".txt":
            raise PrefcliError(f"{option}: {path} is plain text", "this stage needs .jsonl, .json or .parquet records")
        for lineno, rec in iter_records(path):
            missing = [k for k in required if k not in rec]
            if missing:
                raise PrefcliError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}", f"each row needs {', '.join(required)}")
            rows.append(rec | {"_source": f"{path}:{lineno}"})
    if not rows:
        raise PrefcliError(f"{option}: {', '.join(map(str, specs))} holds no records", "pass a file with at least one row")
    return rows


# ---- checks every JSON reader shares: UTF-8 by line and byte, finite numbers

class _NotFinite(ValueError):
    """A JSON number that is NaN or infinite (NaN, Infinity, or a literal like 1e400)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise _NotFinite(text)
    return value


def _no_constant(name: str):
    raise _NotFinite(name)


def _json_loads(text: str):
    """json.loads that refuses NaN, Infinity and numbers too large for a float."""
    return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)


def _utf8(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrefcliError(f"{path}:{lineno}:{e.start}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {e.start} of the line)",
                           "save the file as UTF-8") from None


# ---------------------------------------------------------------- datasets folders and hub names
DATASETS_META = ("dataset_info.json", "state.json", "dataset_dict.json")  # never data rows


def is_datasets_folder(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _datasets_module(path: Path):
    try:
        import datasets
    except ImportError:
        raise PrefcliError(f"{path}: reading a datasets folder or .arrow file needs the datasets package",
                           "pip install 'prefcli[datasets]'")
    return datasets


def iter_datasets_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(row number, record) of a `save_to_disk` folder (a DatasetDict: its train split) or an .arrow shard."""
    datasets = _datasets_module(path)
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise PrefcliError(f"{path}: a DatasetDict with splits {', '.join(splits)} and no 'train'",
                               f"pass the folder of one split, e.g. {path / (splits[0] if splits else 'SPLIT')}")
        path = path / "train"
    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_file(str(path))
    except Exception as e:  # datasets raises many kinds: a short reason is what the user needs
        raise PrefcliError(f"{path}: cannot be read as a datasets folder or .arrow file ({type(e).__name__}: {e})",
                           "write it with Dataset.save_to_disk, or pass .jsonl/.parquet files")
    for i, rec in enumerate(ds, 1):
        yield i, rec


def check_not_a_hub_name(spec: str, path: Path, option: str) -> None:
    """A missing path shaped like `owner/name` is a Hugging Face Hub dataset: say how to download it."""
    import re

    if path.exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec) or Path(spec).suffix in SUPPORTED:
        return
    raise PrefcliError(
        f"{option}: {spec} is not a local file or folder; if it is a Hugging Face Hub dataset, download it first",
        f"python -c \"import datasets; datasets.load_dataset('{spec}').save_to_disk('{spec.split('/')[-1]}')\" "
        f"(or huggingface-cli download {spec} --repo-type dataset --local-dir {spec.split('/')[-1]}), "
        f"then pass {option} {spec.split('/')[-1]}",
    )
