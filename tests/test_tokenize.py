"""`prefcli tokenize` end to end: artifacts, the HF round trip, errors that leave the workspace as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tree_snapshot
from prefcli.chat_format import SPECIAL_TOKENS
from prefcli.data.tokens import read_all
from prefcli.tokenizer import Tokenizer


def test_tokenize_writes_tokenizer_and_dataset(cli, tmp_path, small_corpus):
    ws = tmp_path / "ws"
    r = cli("-w", ws, "tokenize", "--input", small_corpus, "--vocab-size", "320", "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["documents"] == 400
    assert out["train_documents"] + out["val_documents"] == 400
    assert 0 < out["val_documents"] < 60  # about 5%

    tok = Tokenizer(ws / "tokenizers/default")
    assert 263 < tok.vocab_size <= 320  # the tiny corpus runs out of merges before 320
    for t in SPECIAL_TOKENS:
        assert tok.token_id(t) is not None
    train = read_all(ws / "datasets/corpus/train.safetensors")
    val = read_all(ws / "datasets/corpus/val.safetensors")
    assert len(train) == out["train_tokens"] and len(val) == out["val_tokens"]
    eos = tok.eos_id
    # Every document ends with <|eos|>: as many eos as documents.
    assert int((train == eos).sum()) + int((val == eos).sum()) == 400
    # The ids decode back to the corpus text (documents in order, split between train and val).
    text = small_corpus.read_text()
    first_doc = text.split("\n\n")[0]
    docs_val = tok.decode(val.tolist(), skip_special_tokens=False).split("<|eos|>")
    assert docs_val[0] == first_doc  # the first document always goes to val

    meta = json.loads((ws / "datasets/corpus/meta.json").read_text())
    assert meta["kind"] == "dataset" and meta["dtype"] == "U16"
    assert meta["parents"][0]["name"] == "default"
    assert set(meta["files"]) == {"train.safetensors", "val.safetensors"}


def test_reuse_tokenizer_and_split_is_seeded(cli, tmp_path, small_corpus):
    ws = tmp_path / "ws"
    assert cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "300").code == 0
    r = cli("-w", ws, "tokenize", "-i", small_corpus, "--tokenizer", "default", "--dataset", "again", "--json")
    assert r.code == 0, r.stderr
    a = (ws / "datasets/corpus/train.safetensors").read_bytes()
    b = (ws / "datasets/again/train.safetensors").read_bytes()
    assert a == b
    r = cli("-w", ws, "tokenize", "-i", small_corpus, "--tokenizer", "default", "--dataset", "other", "--seed", "7", "--json")
    assert (ws / "datasets/other/train.safetensors").read_bytes() != a


def test_jsonl_text_field(cli, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"document number {i} about cats and dogs"}) for i in range(50)))
    r = cli("-w", tmp_path / "ws", "tokenize", "-i", f, "--text-field", "body", "--vocab-size", "300", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["documents"] == 50


def test_hf_autotokenizer_gives_the_same_ids(cli, tmp_path, small_corpus):
    transformers = pytest.importorskip("transformers")
    ws = tmp_path / "ws"
    assert cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "400").code == 0
    folder = ws / "tokenizers/default"
    ours = Tokenizer(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    text = "the cat sat  on the mat.\nNew line, <|user|> and émojis 🐈 too"
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert ours.decode(ours.encode(text)) == text.replace("<|user|>", "")
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What does the cat do?"},
        {"role": "assistant", "content": " The cat sits on the mat."},
        {"role": "user", "content": "And the dog?"},
    ]
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys"):
        hf_ids = hf_ids["input_ids"]
    assert list(hf_ids) == ours.chat_ids(messages, add_generation_prompt=True)
    # The assistant mask marks exactly the reply and its end token, as transformers' own mask does.
    convo = messages[:3]
    ids, mask = ours.chat_ids_with_mask(convo)
    masked = [i for i, m in zip(ids, mask) if m]
    assert masked == ours.encode(" The cat sits on the mat.<|end|>")
    hf_out = hf.apply_chat_template(convo, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(hf_out["input_ids"]) == ids
    assert list(hf_out["assistant_masks"]) == mask


def _assert_failed(r, *needles):
    assert r.code == 2, (r.code, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    line = errors[0]
    for n in needles:
        assert n in line, line


def test_errors_leave_the_workspace_as_it_was(cli, tmp_path, small_corpus):
    ws = tmp_path / "ws"
    # Nothing exists yet: failures must not even create the workspace.
    _assert_failed(cli("-w", ws, "tokenize", "-i", tmp_path / "missing.txt"), "missing.txt", "not found")
    assert not ws.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    _assert_failed(cli("-w", ws, "tokenize", "-i", empty), "empty corpus")
    assert not ws.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    _assert_failed(cli("-w", ws, "tokenize", "-i", bad), f"{bad}:2", "not valid JSON")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "fine"}\n{"text": "ok"}\n{"body": "x"}\n')
    _assert_failed(cli("-w", ws, "tokenize", "-i", nofield), f"{nofield}:3", "--text-field")
    _assert_failed(cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "100"), "--vocab-size 100", "263")
    _assert_failed(cli("-w", ws, "tokenize", "-i", small_corpus, "--name", "a/b"), "--name", "a/b")
    _assert_failed(cli("-w", ws, "tokenize", "-i", small_corpus, "--dataset", "x..y"), "--dataset")
    assert not ws.exists()

    # An existing artifact is kept as it was without --overwrite.
    assert cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "300").code == 0
    before = tree_snapshot(ws)
    _assert_failed(cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "300"), "already exists", "--overwrite")
    _assert_failed(cli("-w", ws, "tokenize", "-i", bad, "--overwrite"), "not valid JSON")
    assert tree_snapshot(ws) == before
    assert cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "280", "--overwrite").code == 0
    assert Tokenizer(ws / "tokenizers/default").vocab_size == 280  # replaced: the old one had more


def test_unwritable_workspace(cli, tmp_path, small_corpus):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _assert_failed(cli("-w", blocker / "ws", "tokenize", "-i", small_corpus), "cannot be written", "--workspace")


def test_damaged_artifact_is_shown_and_refused(cli, tmp_path, small_corpus):
    ws = tmp_path / "ws"
    assert cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "300").code == 0
    with open(ws / "tokenizers/default/tokenizer.json", "a") as f:
        f.write(" ")
    rows = {r["name"]: r for r in cli("-w", ws, "ls", "--json").json()["artifacts"]}
    assert rows["default"]["damaged"] == ["tokenizer.json"]
    assert rows["corpus"]["damaged"] == []
    _assert_failed(cli("-w", ws, "tokenize", "-i", small_corpus, "--tokenizer", "default", "--dataset", "d2"),
                   "damaged", "tokenizer.json")


def test_ls_shows_lineage(cli, tmp_path, small_corpus):
    ws = tmp_path / "ws"
    assert cli("-w", ws, "tokenize", "-i", small_corpus, "--vocab-size", "300").code == 0
    listing = cli("-w", ws, "ls", "--json").json()
    assert {(a["type"], a["name"]) for a in listing["artifacts"]} == {("tokenizer", "default"), ("dataset", "corpus")}
    one = cli("-w", ws, "ls", "corpus", "--json").json()
    lineage = one["lineage"]
    assert lineage["name"] == "corpus"
    parents = {p.get("name") or Path(p["path"]).name for p in lineage["parents"]}
    assert parents == {"default", "corpus.txt"}
    tok_node = next(p for p in lineage["parents"] if p.get("name") == "default")
    assert Path(tok_node["parents"][0]["path"]).name == "corpus.txt"
    table = cli("-w", ws, "ls")
    assert table.code == 0 and "corpus" in table.stdout and "default" in table.stdout  # the listing is the output: stdout
    _assert_failed(cli("-w", ws, "ls", "nothing"), "nothing")


def test_kill_during_tokenize_leaves_no_partial_artifact(tmp_path):
    """SIGKILL in the middle of encoding: no dataset, and the next run cleans up and succeeds."""
    big = tmp_path / "big.txt"
    line = "the quick brown fox jumps over the lazy dog near the old mill by the river " * 4
    big.write_text("\n\n".join(f"{line} {i}" for i in range(150_000)))
    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "prefcli", "-w", str(ws), "tokenize", "-i", str(big), "--vocab-size", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    # Wait until the artifact is being built in the workspace's temporary folder, then kill.
    while time.time() < deadline:
        tmp = ws / ".tmp"
        if tmp.exists() and any(p.name.startswith("datasets-") for p in tmp.iterdir()):
            break
        time.sleep(0.01)
    else:
        pytest.fail("tokenize never started writing")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ws / "datasets/corpus").exists()
    assert not (ws / "tokenizers/default").exists()
    # The next run sweeps what the killed one left and writes whole artifacts.
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"{line} {i}" for i in range(200)))
    r = subprocess.run([sys.executable, "-m", "prefcli", "-w", str(ws), "tokenize", "-i", str(small), "--vocab-size", "300"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (ws / "datasets/corpus/meta.json").exists()
    assert not (ws / ".tmp").exists()


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_concurrent_writer_gets_a_clear_error(tmp_path):
    from prefcli.errors import PrefcliError
    from prefcli.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    with ws.create("tokenizers", "t", stage="test", config={}) as art:
        (art.path / "x.json").write_text("{}")
        # A second process holds the lock on t2 (an OS file lock, as prefcli takes it).
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ws.root / ".locks" / "tokenizers-t2.lock")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(PrefcliError, match=f"being written by another prefcli process \\(pid {holder.pid}\\)"):
                with ws.create("tokenizers", "t2", stage="test", config={}):
                    pass
        finally:
            holder.kill()
            holder.wait()
    assert json.loads((ws.root / "tokenizers/t/meta.json").read_text())["files"] == {
        "x.json": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    }


def test_interrupt_inside_writer_removes_everything(tmp_path):
    from prefcli.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    with pytest.raises(KeyboardInterrupt):
        with ws.create("models", "m", stage="test", config={}) as art:
            (art.path / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert not (tmp_path / "ws").exists()


def test_parquet_input(cli, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"parquet document {i} about the old mill" for i in range(30)]}), f)
    r = cli("-w", tmp_path / "ws", "tokenize", "-i", f, "--vocab-size", "300", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["documents"] == 30


def test_bad_utf8_is_named_by_file_and_line_not_replaced(cli, tmp_path):
    for name, good, bad, line in (("corpus.txt", b"a fine line\n\n", b"caf\xe9 latte\n", 7),
                                  ("rows.jsonl", b'{"text": "fine"}\n', b'{"text": "caf\xe9"}\n', 4)):
        path = tmp_path / name
        path.write_bytes(good * 3 + bad)
        ws = tmp_path / f"ws-{name}"
        r = cli("-w", ws, "tokenize", "--input", path)
        assert r.code == 2, r.stderr
        assert f"{path}:{line}:" in r.stderr and "not valid UTF-8 (byte 0xe9" in r.stderr
        assert not (ws / "datasets").exists()


def test_windows_line_endings_read_as_plain_text(tmp_path):
    from prefcli.data.readers import iter_txt_documents

    path = tmp_path / "crlf.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    assert list(iter_txt_documents(path)) == ["one\ntwo", "three"]
