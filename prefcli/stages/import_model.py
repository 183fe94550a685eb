"""`prefcli import SOURCE --name NAME`: a local HF model folder or a GGUF file into the workspace.

Recipe: check the source is something prefcli can run, write models/<name> (an HF folder
with its tokenizer; GGUF weights dequantised to float32), and record where it came from:
the source path and the sha256 of a GGUF file in the lineage, the sha256 of every file
written in meta.json (as for every artifact).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from prefcli import hf_import
from prefcli.config import to_dict
from prefcli.artifacts import note
from prefcli.tokenizer import Tokenizer
from prefcli.workspace import Workspace, check_name, sha256_file


@dataclass
class ImportConfig:
    source: str = ""
    name: str | None = None  # default: the source's name, lowercased (e.g. smollm2-135m-instruct.q4_1)
    overwrite: bool = False


def default_name(source: Path) -> str:
    stem = source.name[: -len(".gguf")] if source.name.lower().endswith(".gguf") else source.name
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "imported"


def run(cfg: ImportConfig, ws: Workspace) -> dict:
    t0 = time.time()
    source = Path(cfg.source).expanduser()
    kind = hf_import.source_kind(source)
    name = check_name(cfg.name or default_name(source), "--name")
    ws.check_writable("models", name, cfg.overwrite)
    origin = {"kind": "input", "path": str(source.resolve()), "format": kind}
    if kind == "gguf":
        origin["sha256"] = sha256_file(source)
        note(f"reading {source.name} through transformers' GGUF reader (dequantising; about a minute for 135M parameters)")
    with ws.create("models", name, stage="import", config=to_dict(cfg), parents=[origin], overwrite=cfg.overwrite) as art:
        info = hf_import.import_gguf(source, art.path) if kind == "gguf" else hf_import.import_hf_folder(source, art.path)
        chat = Tokenizer(art.path).has_chat_template
        art.meta["chat"] = chat
        art.meta["metrics"] = {}
        art.meta["import"] = info
    return {"model": name, "source": str(source), **info, "chat": chat, "seconds": round(time.time() - t0, 1)}
