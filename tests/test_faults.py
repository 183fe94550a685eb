"""The fault suite: bad inputs and faults across every command, one table.

Each case runs one command in-process on a copy of a small workspace (built once for
the module) and asserts the README's promise for a failure: the exit code (2 bad
input, 1 runtime failure), one `error:` line on stderr naming the file, line or
option (besides progress lines), no traceback, and a workspace byte-for-byte as it
was. Option ranges and TOML checks are tested with the generated CLI, not here.
"""

from __future__ import annotations

import errno
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import CHAT_LINES, tree_snapshot, write_jsonl

TINY = ["--layers", "1", "--dim", "32", "--heads", "2", "--context", "16", "--batch-size", "2"]
FAST = ["--batch-size", "2", "--device", "cpu"]
RL = ["--max-tokens", "4", "--batch-size", "4", "--num-generations", "2", "--device", "cpu"]
# Lines a failed command may print before its error: progress bars and notes.
NOISE = re.compile(r"^(\S[^:]*: +\d+(/\d+)? .*\[\d\d:\d\d|note: |\s*$)")


def _main(*args) -> None:
    from prefcli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, args


# ---------------------------------------------------------------- the module's workspace and data


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """ws: tokenizer 'default', dataset 'corpus', tiny models 'base' (chat) and 'rm' (reward), runs 'p'
    (pretrain), 'd' (dpo) and 'r' (rloo) with checkpoints at steps 1 and 2, eval 'e'.
    d: data files, good and bad, model folders broken in every way, a module of reward functions."""
    from prefcli.chat_format import render_chat
    from prefcli.model import Transformer, make_config, save_model
    from prefcli.artifacts import generation_config, save_model_artifact, sync_token_ids
    from prefcli.tokenizer import Tokenizer, copy_tokenizer_files
    from prefcli.workspace import Workspace

    root = tmp_path_factory.mktemp("faults")
    d = root / "data"
    d.mkdir()
    ws = root / "ws"
    corpus = d / "corpus.txt"
    words = "the cat sat on a mat with the dog and a bird in the old town shop near river baker".split()
    corpus.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(20)) for i in range(150))
                      + "\n\n" + "\n\n".join(render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                                              for q, a in CHAT_LINES * 10) + "\n")
    _main("-w", ws, "tokenize", "-i", corpus, "--vocab-size", "300")
    tok_path = ws / "tokenizers/default"
    tok = Tokenizer(tok_path)
    for name, kind, seed in (("base", "causal_lm", 0), ("rm", "reward", 1)):
        torch.manual_seed(seed)
        model = Transformer(make_config("tiny", tok.vocab_size, layers=1, dim=32, heads=2, context=64),
                            lm_head=kind == "causal_lm", score_head=kind == "reward")
        sync_token_ids(model, tok)
        save_model_artifact(Workspace(ws), name, model, tok_path, kind=kind, stage="test", config={}, parents=[],
                            metrics={}, overwrite=False, chat=kind == "causal_lm")

    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHAT_LINES]
    pairs = [{"prompt": q, "chosen": a, "rejected": "No. Go away."} for q, a in CHAT_LINES]
    write_jsonl(d / "chats.jsonl", chats)
    write_jsonl(d / "pairs.jsonl", pairs)
    write_jsonl(d / "pairs2.jsonl", pairs[::-1])
    write_jsonl(d / "prompts.jsonl", [{"prompt": q} for q, _ in CHAT_LINES])
    write_jsonl(d / "score.jsonl", [{"prompt": q, "response": a} for q, a in CHAT_LINES])

    def lines(name: str, rows: list, bad_line: int, raw: bytes) -> None:
        """A .jsonl file of good rows whose line `bad_line` is `raw`."""
        out = [json.dumps(r).encode() for r in rows]
        out[bad_line - 1] = raw
        (d / name).write_bytes(b"\n".join(out) + b"\n")

    pair3 = b'{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go.", "margin": %s}'
    for label, number in (("nan", b"NaN"), ("inf", b"Infinity"), ("neginf", b"-Infinity"), ("big", b"1e300"),
                          ("huge", b"1e400"), ("str", b'"high"')):
        lines(f"pairs_margin_{label}.jsonl", pairs, 3, pair3 % number)
    lines("pairs_badutf8.jsonl", pairs, 2, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}')
    lines("pairs_notjson.jsonl", pairs, 4, b'{"prompt": "x", "chosen": ')
    lines("pairs_list.jsonl", pairs, 2, b'["prompt", "chosen"]')
    lines("pairs_norejected.jsonl", pairs, 3, b'{"prompt": "x", "chosen": "y"}')
    lines("chats_badutf8.jsonl", chats, 3, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}')
    lines("chats_notjson.jsonl", chats, 2, b"{oops}")
    lines("chats_noassistant.jsonl", chats, 2, b'{"messages": [{"role": "user", "content": "hi"}]}')
    lines("chats_badrole.jsonl", chats, 4, b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}')
    lines("prompts_badutf8.jsonl", [{"prompt": q} for q, _ in CHAT_LINES], 2, b'{"prompt": "\xc3\x28"}')
    lines("prompts_nofield.jsonl", [{"prompt": q} for q, _ in CHAT_LINES], 3, b'{"question": "hi"}')
    lines("score_badutf8.jsonl", [{"prompt": q, "response": a} for q, a in CHAT_LINES], 2, b'{"prompt": "\x80", "response": "x"}')
    lines("score_nofield.jsonl", [{"prompt": q, "response": a} for q, a in CHAT_LINES], 3, b'{"prompt": "x"}')
    lines("text_badutf8.jsonl", [{"text": "a b c"}] * 5, 4, b'{"text": "ab\xffcd"}')
    lines("text_nofield.jsonl", [{"text": "a b c"}] * 5, 2, b'{"body": "a b"}')
    lines("text_nan.jsonl", [{"text": "a b c"}] * 5, 3, b'{"text": "a b", "score": NaN}')
    (d / "pairs_badutf8.json").write_bytes(b'[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "\xe9t\xe9"}\n]\n')
    (d / "pairs_nan.json").write_text('[{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}]')
    (d / "empty.jsonl").write_text("")
    (d / "table.csv").write_text("text\nhello\n")
    (d / "emptydir").mkdir()

    # Model folders from outside the workspace, broken in every way.
    good = ws / "models/base"
    for name in ("m_truncated", "m_badheader", "m_hidden_abc", "m_config_notjson", "m_noconfig", "m_noweights"):
        shutil.copytree(good, d / name)
        (d / name / "meta.json").unlink()
    weights = (good / "model.safetensors").read_bytes()
    (d / "m_truncated/model.safetensors").write_bytes(weights[: len(weights) // 2])
    (d / "m_badheader/model.safetensors").write_bytes(b"\xff" * 8 + weights[8:])
    cfg = json.loads((good / "config.json").read_text())
    (d / "m_hidden_abc/config.json").write_text(json.dumps(cfg | {"hidden_size": "abc"}))
    (d / "m_config_notjson/config.json").write_text("{ not json")
    (d / "m_noconfig/config.json").unlink()
    (d / "m_noweights/model.safetensors").unlink()
    small = Transformer(make_config("tiny", 200, layers=1, dim=32, heads=2, context=64))  # fewer ids than the tokenizer
    save_model(small, d / "m_smallvocab", kind="causal_lm", generation_config=generation_config(tok))
    copy_tokenizer_files(tok_path, d / "m_smallvocab")

    (d / "faultrewards.py").write_text(textwrap.dedent("""
        def nan(prompts, replies):
            return [float("nan") if i == 1 else 0.5 for i in range(len(replies))]
        def inf(prompts, replies):
            return [float("inf")] * len(replies)
        def short(prompts, replies):
            return [1.0] * (len(replies) - 1)
        def words(prompts, replies):
            return ["good"] * len(replies)
        def boom(prompts, replies):
            raise ZeroDivisionError("division by zero in my scorer")
    """))
    sys.path.insert(0, str(d))

    # Runs to resume: pretrain p, dpo d, rloo r; each with checkpoints at steps 1 and 2.
    _main("-w", ws, "pretrain", *TINY, "--max-steps", "2", "--save-every", "1", "--out", "p",)
    _main("-w", ws, "align", "--method", "dpo", "--policy", "base", "--data", d / "pairs.jsonl", "--max-steps", "2",
          "--save-every", "1", "--val-fraction", "0", *FAST, "--out", "d")
    _main("-w", ws, "align", "--method", "rloo", "--policy", "base", "--prompts", d / "prompts.jsonl", "--reward-fn", "demo",
          "--max-steps", "2", "--save-every", "1", *RL, "--out", "r")
    _main("-w", ws, "eval", "perplexity", "--model", "base", "--limit", "2", "--out", "e")
    yield {"ws": ws, "d": d}
    sys.path.remove(str(d))


# ---------------------------------------------------------------- setups: damage a copy of the workspace first


def damage_meta(how: str, kind: str = "models", name: str = "base") -> Callable:
    def setup(ws: Path, d: Path, mp) -> None:
        meta = ws / kind / name / "meta.json"
        if how == "missing":
            meta.unlink()
        elif how == "list":
            meta.write_text("[1, 2, 3]\n")
        elif how == "notutf8":
            meta.write_bytes(b"{\"kind\": \"model\xff\"}")
        elif how == "notjson":
            meta.write_text("{\"kind\": ")
    return setup


def tamper(path: str) -> Callable:
    def setup(ws: Path, d: Path, mp) -> None:
        f = ws / path
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    return setup


def other_owner(name: str) -> Callable:
    """models/<name> written by some other run than runs/<name>."""
    def setup(ws: Path, d: Path, mp) -> None:
        from prefcli.workspace import sha256_file

        meta_path = ws / "models" / name / "meta.json"
        meta = json.loads(meta_path.read_text()) | {"run_id": "someone-else"}
        meta_path.write_text(json.dumps(meta))
        del meta_path, sha256_file
    return setup


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


def held_by_other_process(name: str, kind: str = "models") -> Callable:
    def setup(ws: Path, d: Path, mp):
        (ws / ".locks").mkdir(exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(ws / ".locks" / f"{kind}-{name}.lock")],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"

        def stop():
            proc.kill()
            proc.wait()
        return stop, str(proc.pid)
    return setup


def disk_full(ws: Path, d: Path, mp) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    mp.setattr("prefcli.trainer.save_file", full)


def stdin_bytes(data: bytes) -> Callable:
    def setup(ws: Path, d: Path, mp) -> None:
        mp.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    return setup


def eval_exists(ws: Path, d: Path, mp) -> None:
    shutil.copy(ws / "evals/e.json", ws / "evals/x.json")


def pipeline_file(body: str) -> Callable:
    def setup(ws: Path, d: Path, mp) -> None:
        (d.parent / "pipe.toml").write_text(body.replace("{d}", str(d)))
    return setup


# ---------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    args: list
    names: list  # substrings the error line must hold ({d} and {ws} are filled in); "{pid}" is a lock holder's pid
    code: int = 2
    setup: Callable | None = None
    tags: list = field(default_factory=list)

    @property
    def command(self) -> str:
        a = self.args
        if a[0] in ("align",):
            return f"align {a[a.index('--method') + 1]}" if "--method" in a else "align"
        if a[0] in ("reward", "eval", "pipeline"):
            return f"{a[0]} {a[1]}"
        return a[0]


def C(id, args, names, code=2, setup=None):
    return Case(id, args.split() if isinstance(args, str) else args, names if isinstance(names, list) else [names], code, setup)


D = "{d}"
SFT = "align --method sft --policy base --max-steps 2 --batch-size 2 --device cpu --data"
DPO = "align --method dpo --policy base --max-steps 2 --batch-size 2 --device cpu --val-fraction 0 --data"
RLOO = "align --method rloo --policy base --max-steps 2 --max-tokens 4 --batch-size 4 --num-generations 2 --device cpu"
GRPO = RLOO.replace("rloo", "grpo")
PFP = "align --method dpo --policy base --max-steps 2 --batch-size 2 --device cpu --pairs-from-policy 2 --max-tokens 4"
PRE = "pretrain " + " ".join(TINY) + " --max-steps 2"
RSCORE = "reward score --device cpu"
RTRAIN = "reward train --base base --max-steps 2 --batch-size 2 --device cpu --val-fraction 0 --data"
PPL = "eval perplexity --limit 2 --device cpu"
EREW = "eval reward --device cpu"
CMP = "eval compare --limit 2 --max-tokens 4 --device cpu --no-kl"
CHAT = "chat --device cpu --max-tokens 4"

CASES = [
    # tokenize
    C("tok-missing-file", f"tokenize -i {D}/nope.txt", ["--input", "nope.txt"]),
    C("tok-bad-utf8", f"tokenize --dataset c2 --name t2 -i {D}/text_badutf8.jsonl", ["text_badutf8.jsonl:4:", "UTF-8"]),
    C("tok-no-text-field", f"tokenize --dataset c2 --name t2 -i {D}/text_nofield.jsonl", ["text_nofield.jsonl:2", "--text-field"]),
    C("tok-nan-number", f"tokenize --dataset c2 --name t2 -i {D}/text_nan.jsonl", ["text_nan.jsonl:3", "NaN"]),
    C("tok-not-json", f"tokenize --dataset c2 --name t2 --text-field prompt -i {D}/pairs_notjson.jsonl", ["pairs_notjson.jsonl:4", "JSON"]),
    C("tok-csv", f"tokenize --dataset c2 --name t2 -i {D}/table.csv", ["table.csv", "supported"]),
    C("tok-empty-folder", f"tokenize --dataset c2 --name t2 -i {D}/emptydir", ["emptydir"]),
    C("tok-glob-no-match", f"tokenize --dataset c2 --name t2 -i {D}/*.nothing", ["*.nothing"]),
    C("tok-bad-name", f"tokenize --name Bad/Name -i {D}/corpus.txt", ["--name", "Bad/Name"]),
    C("tok-exists", f"tokenize -i {D}/corpus.txt", ["tokenizer 'default' already exists", "--overwrite"]),
    C("tok-no-such-tokenizer", f"tokenize --dataset c2 --tokenizer nope -i {D}/corpus.txt", ["--tokenizer", "nope"]),
    C("tok-tokenizer-no-meta", f"tokenize --dataset c2 --tokenizer default -i {D}/corpus.txt", ["--tokenizer", "damaged"],
      setup=damage_meta("missing", "tokenizers", "default")),
    C("tok-locked", f"tokenize --dataset c2 --name t2 -i {D}/corpus.txt", ["'c2' is being written", "pid {pid}"],
      setup=held_by_other_process("c2", "datasets")),
    # pretrain
    C("pre-no-dataset", f"{PRE} --data nope --out q", ["--data", "nope"]),
    C("pre-dataset-no-meta", f"{PRE} --out q", ["--data", "damaged"], setup=damage_meta("missing", "datasets", "corpus")),
    C("pre-dataset-meta-list", f"{PRE} --out q", ["--data", "damaged"], setup=damage_meta("list", "datasets", "corpus")),
    C("pre-tokenizer-tampered", f"{PRE} --out q", ["--data", "changed"], setup=tamper("tokenizers/default/tokenizer.json")),
    C("pre-init-missing", f"{PRE} --out q --init nope", ["--init", "nope"]),
    C("pre-init-truncated", f"{PRE} --out q --init {D}/m_truncated", ["--init", "m_truncated"]),
    C("pre-init-bad-header", f"{PRE} --out q --init {D}/m_badheader", ["--init", "m_badheader"]),
    C("pre-init-hidden-abc", f"{PRE} --out q --init {D}/m_hidden_abc", ["--init", "m_hidden_abc"]),
    C("pre-init-config-notjson", f"{PRE} --out q --init {D}/m_config_notjson", ["--init", "m_config_notjson"]),
    C("pre-init-no-config", f"{PRE} --out q --init {D}/m_noconfig", ["--init", "m_noconfig"]),
    C("pre-init-no-weights", f"{PRE} --out q --init {D}/m_noweights", ["--init", "m_noweights"]),
    C("pre-init-small-vocab", f"{PRE} --out q --init {D}/m_smallvocab", ["--init", "m_smallvocab", "vocab"]),
    C("pre-init-tampered", f"{PRE} --out q --init base", ["--init", "damaged"], setup=tamper("models/base/model.safetensors")),
    C("pre-exists", f"{PRE} --out base", ["model 'base' already exists", "--overwrite"]),
    C("pre-run-exists", f"{PRE} --out p --save-every 1 --overwrite --data nope", ["--data", "nope"]),
    C("pre-bad-out", f"{PRE} --out ../up", ["--out", "../up"]),
    C("pre-resume-no-run", f"{PRE} --out q --resume", ["--resume", "no checkpoint"]),
    C("pre-resume-lr", f"{PRE} --out p --save-every 1 --resume --lr 0.5", ["--resume", "--lr 0.5", "--max-steps"]),
    C("pre-resume-batch-seed", f"{PRE} --out p --save-every 1 --resume --batch-size 4 --seed 7",
      ["--resume", "--batch-size 4", "--seed 7"]),
    C("pre-resume-size", f"{PRE} --out p --save-every 1 --resume --dim 64", ["--resume", "--dim 64"]),
    C("pre-resume-bitflip", f"{PRE} --out p --save-every 1 --resume --max-steps 3",
      ["step-000002 is damaged", "model.safetensors", "step-000001"], setup=tamper("runs/p/checkpoints/step-000002/model.safetensors")),
    C("pre-resume-state-flip", f"{PRE} --out p --save-every 1 --resume --max-steps 3",
      ["step-000002 is damaged", "optimizer.safetensors", "step-000001"],
      setup=tamper("runs/p/checkpoints/step-000002/optimizer.safetensors")),
    C("pre-resume-other-model", f"{PRE} --out p --save-every 1 --resume --max-steps 3",
      ["--resume", "model 'p'", "not written by the run"], setup=other_owner("p")),
    C("pre-locked", f"{PRE} --out q", ["model 'q' is being written", "pid {pid}"], setup=held_by_other_process("q")),
    C("pre-locked-overwrite", f"{PRE} --out p --overwrite", ["model 'p' is being written", "pid {pid}"],
      setup=held_by_other_process("p")),
    C("pre-disk-full", f"{PRE} --out q", ["cannot write checkpoint", "runs/q/checkpoints"], code=1, setup=disk_full),
    C("pre-disk-full-overwrite", f"{PRE} --out p --overwrite", ["cannot write checkpoint", "No space"], code=1, setup=disk_full),
    # align sft
    C("sft-no-data", f"{SFT} {D}/nope.jsonl --out s", ["--data", "nope.jsonl"]),
    C("sft-bad-utf8", f"{SFT} {D}/chats_badutf8.jsonl --out s", ["chats_badutf8.jsonl:3:", "UTF-8"]),
    C("sft-not-json", f"{SFT} {D}/chats_notjson.jsonl --out s", ["chats_notjson.jsonl:2", "JSON"]),
    C("sft-no-assistant", f"{SFT} {D}/chats_noassistant.jsonl --out s", ["chats_noassistant.jsonl:2", "assistant"]),
    C("sft-bad-role", f"{SFT} {D}/chats_badrole.jsonl --out s", ["chats_badrole.jsonl:4", "role"]),
    C("sft-empty", f"{SFT} {D}/empty.jsonl --out s", ["empty.jsonl"]),
    C("sft-policy-missing", f"{SFT} {D}/chats.jsonl --out s --policy nope", ["--policy", "nope"]),
    C("sft-policy-no-meta", f"{SFT} {D}/chats.jsonl --out s", ["--policy", "damaged"], setup=damage_meta("missing")),
    C("sft-policy-meta-list", f"{SFT} {D}/chats.jsonl --out s", ["--policy", "damaged"], setup=damage_meta("list")),
    C("sft-policy-meta-notutf8", f"{SFT} {D}/chats.jsonl --out s", ["--policy", "damaged"], setup=damage_meta("notutf8")),
    C("sft-policy-truncated", f"{SFT} {D}/chats.jsonl --out s --policy {D}/m_truncated", ["--policy", "m_truncated"]),
    C("sft-policy-hidden-abc", f"{SFT} {D}/chats.jsonl --out s --policy {D}/m_hidden_abc", ["--policy", "m_hidden_abc"]),
    C("sft-exists", f"{SFT} {D}/chats.jsonl --out rm", ["model 'rm' already exists"]),
    C("sft-locked", f"{SFT} {D}/chats.jsonl --out s", ["model 's' is being written", "pid {pid}"], setup=held_by_other_process("s")),
    # align dpo (and other preference methods)
    C("dpo-margin-nan", f"{DPO} {D}/pairs_margin_nan.jsonl --out x", ["pairs_margin_nan.jsonl:3", "NaN"]),
    C("dpo-margin-inf", f"{DPO} {D}/pairs_margin_inf.jsonl --out x", ["pairs_margin_inf.jsonl:3", "Infinity"]),
    C("dpo-margin-neginf", f"{DPO} {D}/pairs_margin_neginf.jsonl --out x", ["pairs_margin_neginf.jsonl:3", "Infinity"]),
    C("dpo-margin-1e300", f"{DPO} {D}/pairs_margin_big.jsonl --out x", ["pairs_margin_big.jsonl:3", "margin"]),
    C("dpo-margin-1e400", f"{DPO} {D}/pairs_margin_huge.jsonl --out x", ["pairs_margin_huge.jsonl:3", "1e400"]),
    C("dpo-margin-string", f"{DPO} {D}/pairs_margin_str.jsonl --out x", ["pairs_margin_str.jsonl:3", "margin"]),
    C("dpo-bad-utf8", f"{DPO} {D}/pairs_badutf8.jsonl --out x", ["pairs_badutf8.jsonl:2:", "UTF-8"]),
    C("dpo-bad-utf8-json", f"{DPO} {D}/pairs_badutf8.json --out x", ["pairs_badutf8.json:3:", "UTF-8"]),
    C("dpo-nan-json", f"{DPO} {D}/pairs_nan.json --out x", ["pairs_nan.json", "NaN"]),
    C("dpo-not-json", f"{DPO} {D}/pairs_notjson.jsonl --out x", ["pairs_notjson.jsonl:4", "JSON"]),
    C("dpo-row-list", f"{DPO} {D}/pairs_list.jsonl --out x", ["pairs_list.jsonl:2", "object"]),
    C("dpo-no-rejected", f"{DPO} {D}/pairs_norejected.jsonl --out x", ["pairs_norejected.jsonl:3", "rejected"]),
    C("dpo-reference-missing", f"{DPO} {D}/pairs.jsonl --out x --reference nope", ["--reference", "nope"]),
    C("dpo-reference-bad-header", f"{DPO} {D}/pairs.jsonl --out x --reference {D}/m_badheader", ["--reference", "m_badheader"]),
    C("dpo-policy-meta-notjson", f"{DPO} {D}/pairs.jsonl --out x", ["--policy", "damaged"], setup=damage_meta("notjson")),
    C("dpo-resume-beta", f"{DPO} {D}/pairs.jsonl --out d --save-every 1 --resume --beta 0.5", ["--resume", "--beta 0.5"]),
    C("dpo-resume-data", f"{DPO} {D}/pairs2.jsonl --out d --save-every 1 --resume", ["--resume", "--data"]),
    C("dpo-resume-bitflip", f"{DPO} {D}/pairs.jsonl --out d --save-every 1 --resume --max-steps 3",
      ["step-000002 is damaged", "step-000001"], setup=tamper("runs/d/checkpoints/step-000002/model.safetensors")),
    C("dpo-run-exists", f"{DPO} {D}/pairs.jsonl --out d --save-every 1", ["runs/d", "--resume", "--overwrite"],
      setup=lambda ws, d, mp: shutil.rmtree(ws / "models/d")),
    C("ipo-margin-nan", f"{DPO.replace('dpo', 'ipo')} {D}/pairs_margin_nan.jsonl --out x", ["pairs_margin_nan.jsonl:3"]),
    # align dpo --pairs-from-policy: rewards of the policy's own samples
    C("pfp-reward-nan", f"{PFP} --prompts {D}/prompts.jsonl --reward-fn faultrewards:nan --out x",
      ["faultrewards:nan", "row 1", "nan"]),
    C("pfp-reward-inf", f"{PFP} --prompts {D}/prompts.jsonl --reward-fn faultrewards:inf --out x", ["faultrewards:inf", "inf"]),
    C("pfp-reward-raises", f"{PFP} --prompts {D}/prompts.jsonl --reward-fn faultrewards:boom --out x",
      ["faultrewards:boom", "ZeroDivisionError"], code=1),
    C("pfp-judge-missing", f"{PFP} --prompts {D}/prompts.jsonl --judge-model nope --out x", ["--judge-model", "nope"]),
    C("pfp-prompts-bad-utf8", f"{PFP} --prompts {D}/prompts_badutf8.jsonl --reward-fn demo --out x", ["prompts_badutf8.jsonl:2:"]),
    # align rloo / grpo: online rewards
    C("rloo-reward-nan", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:nan --out x",
      ["faultrewards:nan", "row 1", "nan"]),
    C("rloo-reward-inf", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:inf --out x", ["faultrewards:inf", "inf"]),
    C("rloo-reward-short", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:short --out x",
      ["faultrewards:short", "scores for"]),
    C("rloo-reward-words", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:words --out x",
      ["faultrewards:words", "numbers"]),
    C("rloo-reward-raises", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:boom --out x",
      ["faultrewards:boom", "ZeroDivisionError", "division by zero"], code=1),
    C("rloo-reward-raises-overwrite", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:boom --out r --overwrite",
      ["faultrewards:boom"], code=1),
    C("rloo-reward-no-function", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:nothere --out x",
      ["faultrewards:nothere", "no function"]),
    C("rloo-reward-no-module", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn nosuchmodule_xyz:f --out x",
      ["nosuchmodule_xyz"]),
    C("rloo-prompts-bad-utf8", f"{RLOO} --prompts {D}/prompts_badutf8.jsonl --reward-fn demo --out x", ["prompts_badutf8.jsonl:2:"]),
    C("rloo-prompts-no-field", f"{RLOO} --prompts {D}/prompts_nofield.jsonl --reward-fn demo --out x", ["prompts_nofield.jsonl:3"]),
    C("rloo-reward-model-missing", f"{RLOO} --prompts {D}/prompts.jsonl --reward-model nope --out x", ["--reward-model", "nope"]),
    C("rloo-reward-model-no-meta", f"{RLOO} --prompts {D}/prompts.jsonl --reward-model rm --out x", ["--reward-model", "damaged"],
      setup=damage_meta("missing", "models", "rm")),
    C("rloo-reward-model-causal", f"{RLOO} --prompts {D}/prompts.jsonl --reward-model base --out x", ["--reward-model", "base"]),
    C("rloo-resume-lr", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn demo --out r --save-every 1 --resume --lr 0.5",
      ["--resume", "--lr 0.5"]),
    C("rloo-resume-bitflip", f"{RLOO} --prompts {D}/prompts.jsonl --reward-fn demo --out r --save-every 1 --resume --max-steps 3",
      ["step-000002 is damaged", "step-000001"], setup=tamper("runs/r/checkpoints/step-000002/rng.safetensors")),
    C("grpo-reward-nan", f"{GRPO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:nan --out x", ["faultrewards:nan"]),
    C("grpo-reward-raises", f"{GRPO} --prompts {D}/prompts.jsonl --reward-fn faultrewards:boom --out x", ["faultrewards:boom"],
      code=1),
    # reward train
    C("rt-margin-nan", f"{RTRAIN} {D}/pairs_margin_nan.jsonl --out x", ["pairs_margin_nan.jsonl:3"]),
    C("rt-margin-1e300", f"{RTRAIN} {D}/pairs_margin_big.jsonl --out x", ["pairs_margin_big.jsonl:3", "margin"]),
    C("rt-bad-utf8", f"{RTRAIN} {D}/pairs_badutf8.jsonl --out x", ["pairs_badutf8.jsonl:2:", "UTF-8"]),
    C("rt-no-rejected", f"{RTRAIN} {D}/pairs_norejected.jsonl --out x", ["pairs_norejected.jsonl:3"]),
    C("rt-empty", f"{RTRAIN} {D}/empty.jsonl --out x", ["empty.jsonl"]),
    C("rt-base-missing", f"{RTRAIN} {D}/pairs.jsonl --out x --base nope", ["--base", "nope"]),
    C("rt-base-hidden-abc", f"{RTRAIN} {D}/pairs.jsonl --out x --base {D}/m_hidden_abc", ["--base", "m_hidden_abc"]),
    C("rt-base-small-vocab", f"{RTRAIN} {D}/pairs.jsonl --out x --base {D}/m_smallvocab", ["--base", "vocab"]),
    C("rt-exists", f"{RTRAIN} {D}/pairs.jsonl", ["model 'rm' already exists"]),
    C("rt-locked", f"{RTRAIN} {D}/pairs.jsonl --out x", ["model 'x' is being written", "pid {pid}"], setup=held_by_other_process("x")),
    # reward score
    C("rs-output-missing-dir", f"{RSCORE} -i {D}/score.jsonl -o {D}/no/such/dir/out.jsonl", ["-o/--output", "no/such/dir", "does not exist"]),
    C("rs-bad-utf8", f"{RSCORE} -i {D}/score_badutf8.jsonl", ["score_badutf8.jsonl:2:", "UTF-8"]),
    C("rs-no-field", f"{RSCORE} -i {D}/score_nofield.jsonl", ["score_nofield.jsonl:3"]),
    C("rs-not-json", f"{RSCORE} -i {D}/chats_notjson.jsonl", ["chats_notjson.jsonl:2"]),
    C("rs-model-missing", f"{RSCORE} -i {D}/score.jsonl --model nope", ["--model", "nope"]),
    C("rs-model-causal", f"{RSCORE} -i {D}/score.jsonl --model base", ["--model", "base"]),
    C("rs-model-no-meta", f"{RSCORE} -i {D}/score.jsonl", ["--model", "damaged"], setup=damage_meta("missing", "models", "rm")),
    C("rs-model-tampered", f"{RSCORE} -i {D}/score.jsonl", ["--model", "damaged"], setup=tamper("models/rm/model.safetensors")),
    C("rs-model-truncated", f"{RSCORE} -i {D}/score.jsonl --model {D}/m_truncated", ["--model", "m_truncated"]),
    # chat
    C("chat-model-missing", f"{CHAT} --model nope --prompt hi", ["--model", "nope"]),
    C("chat-no-meta", f"{CHAT} --model base --prompt hi", ["--model", "damaged"], setup=damage_meta("missing")),
    C("chat-meta-list", f"{CHAT} --model base --prompt hi", ["--model", "damaged"], setup=damage_meta("list")),
    C("chat-meta-notutf8", f"{CHAT} --model base --prompt hi", ["--model", "damaged"], setup=damage_meta("notutf8")),
    C("chat-tampered", f"{CHAT} --model base --prompt hi", ["--model", "damaged"], setup=tamper("models/base/model.safetensors")),
    C("chat-truncated", f"{CHAT} --model {D}/m_truncated --prompt hi", ["--model", "m_truncated"]),
    C("chat-bad-header", f"{CHAT} --model {D}/m_badheader --prompt hi", ["--model", "m_badheader"]),
    C("chat-hidden-abc", f"{CHAT} --model {D}/m_hidden_abc --prompt hi", ["--model", "m_hidden_abc"]),
    C("chat-small-vocab", f"{CHAT} --model {D}/m_smallvocab --prompt hi", ["--model", "vocab"]),
    C("chat-stdin-not-utf8", f"{CHAT} --model base", ["UTF-8"], setup=stdin_bytes(b"hello \xff\xfe there\n")),
    C("chat-reward-model", f"{CHAT} --model rm --prompt hi", ["--model", "rm"]),
    # eval perplexity / reward / compare
    C("ppl-model-missing", f"{PPL} --model nope", ["--model", "nope"]),
    C("ppl-data-missing", f"{PPL} --model base --data nope", ["--data", "nope"]),
    C("ppl-bad-utf8", f"{PPL} --model base --data {D}/text_badutf8.jsonl", ["text_badutf8.jsonl:4:", "UTF-8"]),
    C("ppl-no-meta", f"{PPL} --model base", ["--model", "damaged"], setup=damage_meta("missing")),
    C("ppl-bad-header", f"{PPL} --model {D}/m_badheader", ["--model", "m_badheader"]),
    C("ppl-exists", f"{PPL} --model base --out x", ["eval 'x' already exists"], setup=eval_exists),
    C("erew-margin-nan", f"{EREW} --pairs {D}/pairs_margin_nan.jsonl", ["pairs_margin_nan.jsonl:3"]),
    C("erew-bad-utf8", f"{EREW} --pairs {D}/pairs_badutf8.jsonl", ["pairs_badutf8.jsonl:2:"]),
    C("erew-model-missing", f"{EREW} --pairs {D}/pairs.jsonl --model nope", ["--model", "nope"]),
    C("erew-model-causal", f"{EREW} --pairs {D}/pairs.jsonl --model base", ["--model", "base"]),
    C("erew-pairs-missing", f"{EREW} --pairs {D}/nope.jsonl", ["--pairs", "nope.jsonl"]),
    C("erew-model-meta-list", f"{EREW} --pairs {D}/pairs.jsonl", ["--model", "damaged"], setup=damage_meta("list", "models", "rm")),
    C("cmp-model-missing", f"{CMP} --model nope --prompts {D}/prompts.jsonl", ["--model", "nope"]),
    C("cmp-reference-missing", f"{CMP} --model base --reference nope --prompts {D}/prompts.jsonl", ["--reference", "nope"]),
    C("cmp-judge-causal", f"{CMP} --model base --reference base --judge-model base --prompts {D}/prompts.jsonl",
      ["--judge-model", "base"]),
    C("cmp-prompts-bad-utf8", f"{CMP} --model base --reference base --prompts {D}/prompts_badutf8.jsonl", ["prompts_badutf8.jsonl:2:"]),
    C("cmp-prompts-no-field", f"{CMP} --model base --reference base --prompts {D}/prompts_nofield.jsonl", ["prompts_nofield.jsonl:3"]),
    C("cmp-model-truncated", f"{CMP} --model {D}/m_truncated --reference base --prompts {D}/prompts.jsonl", ["m_truncated"]),
    # ls
    C("ls-missing", "ls nope", ["'nope'"]),
    # pipeline
    C("pipe-file-missing", f"pipeline run {D}/nope.toml", ["nope.toml"]),
    C("pipe-stage-bad-data", f"pipeline run {D}/../pipe.toml", ["pairs_margin_nan.jsonl:3"],
      setup=pipeline_file('[[stage]]\ncommand = "align"\noptions = { method = "dpo", policy = "base", out = "x", '
                          'data = ["{d}/pairs_margin_nan.jsonl"], max-steps = 1, batch-size = 2 }\n')),
    C("pipe-stage-bad-utf8", f"pipeline run {D}/../pipe.toml", ["chats_badutf8.jsonl:3:"],
      setup=pipeline_file('[[stage]]\ncommand = "align"\noptions = { method = "sft", policy = "base", out = "x", '
                          'data = ["{d}/chats_badutf8.jsonl"], max-steps = 1, batch-size = 2 }\n')),
    C("pipe-stage-model-damaged", f"pipeline run {D}/../pipe.toml", ["--policy", "damaged"],
      setup=lambda ws, d, mp: (pipeline_file('[[stage]]\ncommand = "align"\noptions = { method = "sft", policy = "base", '
                                             'out = "x", data = ["{d}/chats.jsonl"], max-steps = 1, batch-size = 2 }\n')(ws, d, mp),
                               damage_meta("missing")(ws, d, mp))[0]),
    C("pipe-stage-locked", f"pipeline run {D}/../pipe.toml", ["model 'x' is being written", "pid {pid}"],
      setup=lambda ws, d, mp: (pipeline_file('[[stage]]\ncommand = "align"\noptions = { method = "sft", policy = "base", '
                                             'out = "x", data = ["{d}/chats.jsonl"], max-steps = 1, batch-size = 2 }\n')(ws, d, mp),
                               held_by_other_process("x")(ws, d, mp))[1]),
    C("pipe-stage-reward-raises", f"pipeline run {D}/../pipe.toml", ["faultrewards:boom"], code=1,
      setup=pipeline_file('[[stage]]\ncommand = "align"\noptions = { method = "rloo", policy = "base", out = "x", '
                          'prompts = ["{d}/prompts.jsonl"], reward-fn = ["faultrewards:boom"], max-steps = 1, '
                          'batch-size = 4, num-generations = 2, max-tokens = 4 }\n')),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case, base, cli, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(base["ws"], ws, symlinks=True)
    d = base["d"]
    stop, pid = None, None
    if case.setup is not None:
        got = case.setup(ws, d, monkeypatch)
        if isinstance(got, tuple):
            stop, pid = got
    before = tree_snapshot(ws)
    try:
        r = cli("-w", ws, *[a.replace("{d}", str(d)) for a in case.args])
    finally:
        if stop is not None:
            stop()
    assert r.code == case.code, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if not NOISE.match(line)]
    if case.command == "pipeline run":
        # The pipeline shows its plan and a status table around the failed stage's own one line.
        lines = [line for line in lines if line.startswith("error: ")]
        assert len(lines) == 1 or (len(lines) == 2 and "failed with exit code" in lines[1]), r.stderr
    assert len(lines) >= 1 and lines[0].startswith("error: "), r.stderr
    if case.command != "pipeline run":
        assert len(lines) == 1, r.stderr
    for name in case.names:
        assert name.replace("{d}", str(d)).replace("{pid}", str(pid)) in lines[0], lines[0]
    assert tree_snapshot(ws) == before


def test_the_table_covers_every_command_with_100_cases():
    by_command: dict[str, int] = {}
    for case in CASES:
        by_command[case.command] = by_command.get(case.command, 0) + 1
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
    for command in ("tokenize", "pretrain", "align sft", "align dpo", "align rloo", "align grpo", "reward train",
                    "reward score", "chat", "eval perplexity", "eval reward", "eval compare", "ls", "pipeline run"):
        assert by_command.get(command), command


# ---------------------------------------------------------------- the defects, one test each beyond the table


@pytest.fixture
def ws(base, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(base["ws"], ws, symlinks=True)
    return ws


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def test_overwrite_swaps_in_the_new_run_and_model_only_when_complete(cli, ws):
    old_run = json.loads((ws / "runs/p/run.json").read_text())["run_id"]
    r = cli("-w", ws, *PRE.split(), "--out", "p", "--overwrite", "--max-steps", "3", "--save-every", "3")
    assert r.code == 0, r.stderr
    new_run = json.loads((ws / "runs/p/run.json").read_text())["run_id"]
    assert new_run != old_run and _meta(ws / "models/p")["run_id"] == new_run
    assert [c.name for c in sorted((ws / "runs/p/checkpoints").iterdir())] == ["step-000003"]
    assert not (ws / "runs/.p.new").exists() and not (ws / ".tmp").exists() and not (ws / ".locks").exists()


def test_resume_may_change_only_the_listed_options_and_keeps_its_model(cli, ws):
    r = cli("-w", ws, *PRE.split(), "--out", "p", "--resume", "--max-steps", "3", "--save-every", "1", "--eval-every", "2",
            "--device", "cpu", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["steps"] == 3
    assert _meta(ws / "models/p")["run_id"] == json.loads((ws / "runs/p/run.json").read_text())["run_id"]
    r = cli("-w", ws, *PRE.split(), "--out", "p", "--resume", "--warmup", "1")
    assert r.code == 2 and "--warmup 1" in r.stderr and "--max-steps" in r.stderr  # the hint lists what may change


def test_damaged_meta_is_shown_by_ls_and_chat_still_works(cli, ws):
    (ws / "models/base/meta.json").unlink()
    (ws / "models/rm/meta.json").write_text("[1, 2]")
    (ws / "datasets/corpus/meta.json").write_bytes(b"\xff\xfe{}")
    r = cli("-w", ws, "ls", "--json")
    assert r.code == 0, r.stderr
    damaged = {f"{row['kind']}/{row['name']}": row["damaged"] for row in r.json()["artifacts"]}
    assert damaged["models/base"] == damaged["models/rm"] == damaged["datasets/corpus"] == ["meta.json"]
    assert damaged["models/p"] == [] and damaged["tokenizers/default"] == []
    r = cli("-w", ws, "ls")
    assert r.code == 0 and sum(line.rstrip().endswith(" damaged") for line in r.stdout.splitlines()) == 3, r.stdout
    r = cli("-w", ws, "chat", "--prompt", "hi", "--max-tokens", "2", "--device", "cpu")  # picks an undamaged chat model
    assert r.code == 0, r.stderr


def test_moved_and_copied_workspaces_read_only_their_own_files(cli, ws, tmp_path):
    moved = tmp_path / "moved"
    ws.rename(moved)
    r = cli("-w", moved, *PRE.split(), "--out", "q")
    assert r.code == 0, r.stderr
    parents = {p["kind"]: p for p in _meta(moved / "models/q")["parents"]}
    assert parents["tokenizers"]["path"] == "tokenizers/default" and len(parents["tokenizers"]["sha256"]) == 64
    # A copy keeps working when the original goes away: it never reads the original's files.
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(moved), str(copy)], check=True)
    shutil.rmtree(moved / "tokenizers")
    r = cli("-w", copy, *PRE.split(), "--out", "q2")
    assert r.code == 0, r.stderr
    # Old lineage held absolute paths: one into another workspace is read from this one.
    meta = _meta(copy / "datasets/corpus")
    for p in meta["parents"]:
        if p.get("kind") == "tokenizers":
            p["path"] = str(moved / "tokenizers/default")
    (copy / "datasets/corpus/meta.json").write_text(json.dumps(meta))
    r = cli("-w", copy, *PRE.split(), "--out", "q3")
    assert r.code == 0, r.stderr


def test_diverged_training_is_a_runtime_failure_that_leaves_nothing(cli, ws, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("nan")))
    before = tree_snapshot(ws)
    r = cli("-w", ws, *PRE.split(), "--out", "q")
    assert r.code == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if not NOISE.match(line)]
    assert lines == [lines[0]] and lines[0].startswith("error: training diverged: grad_norm is nan at step 1"), r.stderr
    assert tree_snapshot(ws) == before


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_written(cli, ws, monkeypatch):
    from prefcli.trainer import Trainer

    def interrupted(self, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_step", interrupted)
    before = tree_snapshot(ws)
    r = cli("-w", ws, *PRE.split(), "--out", "q")
    assert r.code == 130
    assert r.stderr.strip().splitlines()[-1] == "interrupted at step 0, before the first checkpoint; nothing was written"
    assert tree_snapshot(ws) == before
