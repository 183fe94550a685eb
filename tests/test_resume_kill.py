"""kill -9 at a random moment, then --resume: the model is bit-identical to an uninterrupted run's.

One run per training family (pretrain, a preference method, an online method), each a
real `python -m prefcli` process killed with SIGKILL; plus two writers racing for one
name, and stale locks taken over.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CHAT_LINES, write_jsonl

REPO = Path(__file__).resolve().parent.parent
TINY = ["--layers", "1", "--dim", "32", "--heads", "2", "--context", "16", "--batch-size", "2"]
FAMILIES = {
    "pretrain": ["pretrain", *TINY, "--max-steps", "16", "--save-every", "2"],
    "dpo": ["align", "--method", "dpo", "--policy", "base", "--data", "{pairs}", "--max-steps", "10", "--save-every", "2",
            "--batch-size", "2", "--val-fraction", "0", "--device", "cpu"],
    "rloo": ["align", "--method", "rloo", "--policy", "base", "--prompts", "{prompts}", "--reward-fn", "demo",
             "--max-steps", "8", "--save-every", "2", "--max-tokens", "4", "--batch-size", "4", "--num-generations", "2",
             "--device", "cpu"],
}


def _env() -> dict:
    return os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PREFCLI_WORKSPACE": ""}


def prefcli(ws: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefcli", "-w", str(ws), *map(str, args)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory):
    """A workspace with a tokenizer, its dataset and a tiny chat model 'base'; pairs and prompts files."""
    from prefcli.chat_format import render_chat
    from prefcli.cli import main
    from prefcli.model import Transformer, make_config
    from prefcli.artifacts import save_model_artifact, sync_token_ids
    from prefcli.tokenizer import Tokenizer
    from prefcli.workspace import Workspace

    root = tmp_path_factory.mktemp("kill")
    corpus = root / "corpus.txt"
    words = "the cat sat on a mat with the dog and a bird in the old town shop near river baker".split()
    corpus.write_text("\n\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(20)) for i in range(150)) + "\n\n"
                      + "\n\n".join(render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                                    for q, a in CHAT_LINES * 10) + "\n")
    ws = root / "ws"
    with pytest.raises(SystemExit) as e:
        main(["-w", str(ws), "tokenize", "-i", str(corpus), "--vocab-size", "300"])
    assert e.value.code == 0
    tok = Tokenizer(ws / "tokenizers/default")
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", tok.vocab_size, layers=1, dim=32, heads=2, context=64))
    sync_token_ids(model, tok)
    save_model_artifact(Workspace(ws), "base", model, ws / "tokenizers/default", kind="causal_lm", stage="test",
                        config={}, parents=[], metrics={}, overwrite=False, chat=True)
    write_jsonl(root / "pairs.jsonl", [{"prompt": q, "chosen": a, "rejected": "No. Go away."} for q, a in CHAT_LINES])
    write_jsonl(root / "prompts.jsonl", [{"prompt": q} for q, _ in CHAT_LINES])
    return root


def _args(family: str, root: Path) -> list[str]:
    return [a.format(pairs=root / "pairs.jsonl", prompts=root / "prompts.jsonl") for a in FAMILIES[family]]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kill_at_a_random_moment_then_resume_is_bit_identical(family, base_ws, tmp_path):
    ws_full, ws_killed = tmp_path / "full", tmp_path / "killed"
    shutil.copytree(base_ws / "ws", ws_full)
    shutil.copytree(base_ws / "ws", ws_killed)
    args = _args(family, base_ws)
    full = prefcli(ws_full, *args, "--out", "m")
    victim = prefcli(ws_killed, *args, "--out", "m")
    # A random moment after the first checkpoint: mid-step, mid-checkpoint or during the final save.
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    first = ws_killed / "runs/m/checkpoints/step-000002"
    deadline = time.time() + 120
    while not first.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.8))
    killed_at = [p.name for p in (ws_killed / "runs/m/checkpoints").glob("step-*")]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert full.wait(timeout=300) == 0, full.stderr.read()
    # Whatever the moment, no partial model is visible.
    model = ws_killed / "models/m"
    assert not model.exists() or (model / "meta.json").is_file()
    resumed = prefcli(ws_killed, *args, "--out", "m", "--resume")
    assert resumed.wait(timeout=300) == 0, f"seed {seed}, killed with {killed_at}: {resumed.stderr.read()}"
    a = load_file(ws_full / "models/m/model.safetensors")
    b = load_file(ws_killed / "models/m/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{family}: {k} differs after resume (seed {seed}, killed with {killed_at})"
    assert not list((ws_killed / "runs/m/checkpoints").glob(".tmp-*"))
    assert not (ws_killed / ".tmp").exists() or not any((ws_killed / ".tmp").iterdir())


def test_two_writers_racing_for_one_name(base_ws, tmp_path):
    """Both start at once: one trains, the other is refused at its start naming the holder's pid;
    a second writer with --overwrite cannot delete the first's live run either."""
    ws = tmp_path / "ws"
    shutil.copytree(base_ws / "ws", ws)
    args = ["pretrain", *TINY, "--max-steps", "60", "--save-every", "5", "--out", "same"]
    first, second = prefcli(ws, *args), prefcli(ws, *args)
    codes = {first.pid: first.wait(timeout=300), second.pid: second.wait(timeout=300)}
    errors = {first.pid: first.stderr.read(), second.pid: second.stderr.read()}
    assert sorted(codes.values()) == [0, 2], errors
    winner = next(pid for pid, code in codes.items() if code == 0)
    loser = next(pid for pid, code in codes.items() if code == 2)
    assert f"model 'same' is being written by another prefcli process (pid {winner})" in errors[loser]
    assert "Traceback" not in errors[loser]
    assert (ws / "models/same/meta.json").is_file()

    # The example: a long run, then a second writer with --overwrite a few seconds in.
    long = prefcli(ws, *args[:-4], "--max-steps", "5000", "--save-every", "5", "--out", "long")
    run = ws / "runs/long/checkpoints/step-000005"
    deadline = time.time() + 120
    while not run.exists() and time.time() < deadline:
        time.sleep(0.01)
    intruder = prefcli(ws, *args[:-4], "--max-steps", "2", "--out", "long", "--overwrite")
    assert intruder.wait(timeout=300) == 2
    assert f"model 'long' is being written by another prefcli process (pid {long.pid})" in intruder.stderr.read()
    assert long.poll() is None and list((ws / "runs/long/checkpoints").glob("step-*"))  # still training, its run untouched
    # Ctrl-C: exit 130 with one line saying where it stopped and how to continue.
    long.send_signal(signal.SIGINT)
    assert long.wait(timeout=120) == 130
    last = long.stderr.read().strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted at step \d+; \S+runs/long is kept: continue with --resume "
                        r"\(from its checkpoint step-\d{6}\)", last), last
    assert not list((ws / "runs/long/checkpoints").glob(".tmp-*"))


def test_stale_locks_are_taken_over(cli, base_ws, tmp_path):
    """A lock file left by a killed process, or naming a live process that holds no lock, is no obstacle."""
    ws = tmp_path / "ws"
    shutil.copytree(base_ws / "ws", ws)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ws / ".locks").mkdir()
    (ws / ".locks/models-a.lock").write_text(f"{dead.pid}\n")  # a dead pid
    (ws / ".locks/models-b.lock").write_text("1\n")  # a live pid that is not prefcli
    for name in ("a", "b"):
        r = cli("-w", ws, "pretrain", *TINY, "--max-steps", "1", "--out", name)
        assert r.code == 0, r.stderr
    assert not (ws / ".locks").exists()
