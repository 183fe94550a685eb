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
