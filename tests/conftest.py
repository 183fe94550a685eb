"""Shared test helpers: run the CLI in-process and capture what it prints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

# Two cores, several suites: keep each test process on few threads so runs stay repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def cli(capsys):
    """cli(*args) -> CliResult: runs `prefcli ARGS` in this process."""
    from prefcli.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def tree_snapshot(root) -> dict:
    """Every file under root with its bytes: to show a failed command changed nothing."""
    from pathlib import Path

    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} | {
        str(p.relative_to(root)) + "/": b"" for p in sorted(root.rglob("*")) if p.is_dir()
    }


@pytest.fixture
def small_corpus(tmp_path):
    """A few hundred short documents of plain English, as a .txt file split at blank lines."""
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat with the dog and a bird in the old town shop near river baker".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(25)) for _ in range(400)) + "\n")
    return path


CHAT_LINES = [
    ("What is two plus three?", "Two plus three is five."),
    ("Say something kind to Ana.", "Ana, you are a wonderful friend."),
    ("Who runs the bakery?", "Ben runs the bakery."),
    ("What color is the cat?", "The cat is black."),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_ws(cli, tmp_path, small_corpus):
    """A workspace with a tokenizer and a tiny random base model ('base'), plus small chat data files."""
    from prefcli.chat_format import render_chat
    from prefcli.model import Transformer, make_config
    from prefcli.artifacts import save_model_artifact, sync_token_ids
    from prefcli.tokenizer import Tokenizer
    from prefcli.workspace import Workspace

    ws = tmp_path / "ws"
    corpus = tmp_path / "chats.txt"
    corpus.write_text(small_corpus.read_text() + "\n\n" + "\n\n".join(
        render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in CHAT_LINES * 20))
    assert cli("-w", ws, "tokenize", "-i", corpus, "--vocab-size", "400").code == 0
    tok_path = ws / "tokenizers/default"
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", tok.vocab_size, layers=2, dim=32, heads=2, context=64))
    sync_token_ids(model, tok)
    save_model_artifact(Workspace(ws), "base", model, tok_path, kind="causal_lm", stage="test", config={},
                        parents=[], metrics={}, overwrite=False, chat=False)
    files = {
        "chats": write_jsonl(tmp_path / "chats.jsonl", [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHAT_LINES]),
        "pairs": write_jsonl(tmp_path / "pairs.jsonl", [
            {"prompt": q, "chosen": a, "rejected": "No. Go away, " + a.lower()} for q, a in CHAT_LINES]),
        "kto": write_jsonl(tmp_path / "kto.jsonl", [
            {"prompt": q, "completion": c, "label": good} for q, a in CHAT_LINES
            for c, good in ((a, True), ("Go away.", False))]),
    }
    return ws, files
