"""`prefcli chat`: replies equal fresh greedy decoding, the KV cache carried across turns, overflow,
scripts (--prompt, piped lines, --json), the REPL through a pseudo-terminal, errors."""

from __future__ import annotations

import io
import json
import os
import random
import sys

import pytest
import torch

from prefcli.cli import main
from prefcli.errors import PrefcliError
from prefcli.generate import generate
from prefcli.model import Transformer, make_config
from prefcli.conversation import Conversation, Sampling, StreamDecoder, raw_join
from prefcli.stages.chat import default_model, load, read_messages
from prefcli.artifacts import save_model_artifact, sync_token_ids
from prefcli.tokenizer import Tokenizer
from prefcli.workspace import Workspace

CPU = torch.device("cpu")


def _random_model(tok: Tokenizer, seed: int, context: int, dim: int = 32, layers: int = 2) -> Transformer:
    """Random weights large enough for peaked, varied greedy choices; stop tokens never win.

    The stop tokens' rows of the (untied) head are zero, so their logit is 0 while the best
    of ~300 random logits is positive: replies always run to max_tokens (long, stop-free).
    """
    cfg = make_config("tiny", tok.vocab_size, layers=layers, dim=dim, heads=4, context=context,
                      tie_word_embeddings=False)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=g))
        model.lm_head.weight[tok.stop_ids()] = 0
    sync_token_ids(model, tok)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding a tiny model one token at a time gains nothing from threads, and with other suites
    running on the same two cores, two spinning threads made these tests 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_thread):
    """A workspace with a tokenizer (vocab 300) and random models:
    sft (chat, context 4096: long replies to interrupt), base (pretrain, chat false),
    and, in a second workspace used by path, short (chat, context 64: overflows fast)."""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    words = "the cat sat on a mat with the dog and a bird in the old town shop near river baker".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(25)) for _ in range(400)) + "\n")
    w = Workspace(root / "ws")
    try:
        main(["-w", str(w.root), "tokenize", "-i", str(corpus), "--vocab-size", "300"])
    except SystemExit as e:
        assert not e.code
    tok_dir = w.root / "tokenizers/default"
    tok = Tokenizer(tok_dir)

    def save(space, name, model, chat, stage):
        save_model_artifact(space, name, model, tok_dir, kind="causal_lm", stage=stage, config={}, parents=[],
                            metrics={}, overwrite=False, chat=chat)

    save(w, "base", _random_model(tok, 1, 256), False, "pretrain")
    save(w, "sft", _random_model(tok, 0, 4096, dim=128, layers=4), True, "align sft")
    save(Workspace(root / "other"), "short", _random_model(tok, 2, 64), True, "align sft")
    w.short = root / "other/models/short"
    return w


def conversation(ws, ref="sft", raw=False, **sampling) -> Conversation:
    loaded, raw, _ = load(ws, str(ref), CPU, raw)
    return Conversation(loaded, str(ref), raw=raw, sampling=Sampling(**{"temperature": 0, **sampling}))


def fresh_greedy(conv: Conversation, messages: list[dict], n: int) -> list[int]:
    """The reply a fresh prefill of the whole history gives (no cache carried over)."""
    ids = conv.prompt_ids(messages)
    return generate(conv.loaded.model, [ids], max_new_tokens=n, temperature=0, stop_ids=conv.stop_ids)[0].tokens


def fresh_text(conv, messages, n) -> str:
    return conv.tok.decode(fresh_greedy(conv, messages, n))


# ----------------------------------------------------------------------------- scripts

def test_prompt_greedy_is_repeatable_and_equals_generate(cli, ws):
    args = ("-w", ws.root, "chat", "--prompt", "the cat sat", "--temperature", "0", "--max-tokens", "12")
    first, second = cli(*args), cli(*args)
    assert first.code == 0, first.stderr
    assert first.stdout == second.stdout
    # No --model: the newest chat model (base is not one), named on stderr.
    assert "model: sft (the newest SFT model" in first.stderr
    conv = conversation(ws)
    expected = fresh_text(conv, [{"role": "user", "content": "the cat sat"}], 12)
    assert first.stdout == expected + "\n" and len(expected) > 5

    r = cli(*args, "--system", "be brief", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["model"] == "sft" and doc["raw"] is False
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
    assert doc["messages"] == msgs + [{"role": "assistant", "content": fresh_text(conv, msgs, 12)}]


def keep_context(tmp_path):
    """--keep-context through a config file (the setting of ChatConfig; works with every command line)."""
    path = tmp_path / "keep.toml"
    path.write_text("keep_context = true\n")
    return ("--config", path)


def test_piped_lines_are_independent_prompts_like_prompt(cli, ws, monkeypatch):
    lines = ["the cat sat", "", "and the dog", "a bird in the town"]
    args = ("-w", ws.root, "chat", "--model", "sft", "--system", "be kind", "--temperature", "1.0", "--max-tokens", "12",
            "--seed", "3")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    r = cli(*args)
    assert r.code == 0, r.stderr
    one_by_one = [cli(*args, "--prompt", line) for line in lines if line]
    assert all(x.code == 0 for x in one_by_one)
    # A file of prompts gives the replies of --prompt one by one (same seed for each prompt).
    assert r.stdout.splitlines() == [" ".join(x.stdout.rstrip("\n").splitlines()) for x in one_by_one]
    assert len(set(r.stdout.splitlines())) == 3  # and they are not one reply repeated

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    doc = cli(*args, "--json").json()
    assert "messages" not in doc and len(doc["conversations"]) == 3
    for convo, line, x in zip(doc["conversations"], [ln for ln in lines if ln], one_by_one):
        assert convo[:2] == [{"role": "system", "content": "be kind"}, {"role": "user", "content": line}]
        assert len(convo) == 3 and convo[2]["role"] == "assistant" and convo[2]["content"] == x.stdout.rstrip("\n")


def test_piped_lines_one_reply_each_and_json(cli, ws, monkeypatch, tmp_path):
    lines = ["the cat sat", "", "and the dog", "a bird in the town"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    r = cli("-w", ws.root, "chat", "--model", "sft", "--temperature", "0", "--max-tokens", "10", *keep_context(tmp_path))
    assert r.code == 0, r.stderr
    replies = r.stdout.splitlines()
    assert len(replies) == 3  # the blank line is skipped

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    r = cli("-w", ws.root, "chat", "--model", "sft", "--temperature", "0", "--max-tokens", "10", "--json",
            *keep_context(tmp_path))
    msgs = r.json()["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert [m["content"] for m in msgs[::2]] == ["the cat sat", "and the dog", "a bird in the town"]
    # Every reply (cache carried over turn to turn) equals a fresh prefill of the history before it.
    conv = conversation(ws)
    for i in (1, 3, 5):
        assert msgs[i]["content"] == fresh_text(conv, msgs[:i], 10)
        assert replies[i // 2] == " ".join(msgs[i]["content"].splitlines())


def test_raw_continuation_and_base_model_note(cli, ws):
    r = cli("-w", ws.root, "chat", "--model", "base", "--prompt", "the cat", "--temperature", "0", "--max-tokens", "8")
    assert r.code == 0, r.stderr
    assert "base is not a chat model" in r.stderr and "as with --raw" in r.stderr
    tok = Tokenizer(ws.root / "models/base")
    model = load(ws, "base", CPU, True)[0].model
    ids = [tok.bos_id] + tok.encode("the cat")
    out = generate(model, [ids], max_new_tokens=8, temperature=0, stop_ids=tok.stop_ids(chat=False))[0].tokens
    assert r.stdout == tok.decode(out) + "\n"
    # --raw on a chat model: no template, the same plain continuation.
    r = cli("-w", ws.root, "chat", "--model", "sft", "--raw", "--prompt", "the cat", "--temperature", "0",
            "--max-tokens", "8", "--json")
    doc = r.json()
    assert doc["raw"] is True
    conv = conversation(ws, raw=True)
    assert doc["messages"][1]["content"] == fresh_text(conv, doc["messages"][:1], 8)
    assert raw_join(["the cat", " sat", "on it", "\nend"]) == "the cat sat on it\nend"


def test_sampling_with_seed_is_repeatable(cli, ws):
    args = ("-w", ws.root, "chat", "--model", "sft", "--prompt", "hello", "--temperature", "1.0", "--top-k", "50",
            "--top-p", "0.95", "--max-tokens", "16", "--seed", "3")
    a, b = cli(*args), cli(*args)
    assert a.code == 0 and a.stdout == b.stdout
    c = cli(*args[:-1], "4")
    assert c.stdout != a.stdout


# ----------------------------------------------------------------------------- the conversation engine

def test_kv_cache_carry_over_equals_fresh_prefill(ws):
    conv = conversation(ws, max_tokens=9)
    fed = []
    hook = conv.loaded.model.register_forward_pre_hook(lambda m, args, kw: fed.append(args[0].shape[1]) if args else
                                                       fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        for i, text in enumerate(["the cat sat", "and the dog", "a bird", "the old town shop"]):
            before = list(conv.session.tokens)
            expected = fresh_greedy(conv, conv.messages + [{"role": "user", "content": text}], 9)
            fed.clear()
            r = conv.reply(text)
            ids = conv.prompt_ids(conv.messages[:-1])
            assert r.tokens == expected  # the same tokens as a fresh prefill of the whole history
            assert conv.session.tokens == ids + r.tokens
            common = next((k for k, (a, b) in enumerate(zip(before, ids)) if a != b), min(len(before), len(ids)))
            if i:
                # Only the new turn is prefilled: what the cache held (all the previous prompt at least)
                # is reused; one token before the divergence may be fed again for its logits.
                assert common >= len(conv.prompt_ids(conv.messages[:-3]))
                assert fed[0] == r.prefilled <= len(ids) - common + 1 < len(ids)
        # A new system prompt changes the start: the cache is rebuilt and still agrees.
        conv.set_system("be kind")
        expected = fresh_greedy(conv, conv.messages + [{"role": "user", "content": "hi"}], 9)
        r = conv.reply("hi")
        assert r.tokens == expected and r.prefilled >= len(conv.prompt_ids(conv.messages[:-1])) - 1
    finally:
        hook.remove()


def test_overflow_drops_oldest_turns_keeps_system(ws):
    conv = conversation(ws, ws.short, max_tokens=8)
    assert conv.max_len == 64
    conv.set_system("be kind")
    dropped = 0
    for i in range(8):
        text = f"turn {i} the cat sat"
        r = conv.reply(text)
        dropped += r.dropped
        history = conv.messages[:-1]
        assert history[0] == {"role": "system", "content": "be kind"} and history[-1]["content"] == text
        assert len(conv.prompt_ids(history)) + 8 <= 64 and conv.session.length <= 64
        assert r.tokens == fresh_greedy(conv, history, 8)  # rebuilt cache = fresh prefill of what is kept
    assert dropped > 0
    users = [m["content"] for m in conv.messages if m["role"] == "user"]
    assert "turn 0 the cat sat" not in users and users[-1] == "turn 7 the cat sat"
    assert [m["role"] for m in conv.messages[1:]] == ["user", "assistant"] * (len(conv.messages) // 2)

    # A message that cannot fit even alone is an error, and the conversation is left as it was.
    before = [dict(m) for m in conv.messages]
    with pytest.raises(PrefcliError, match="holds 64"):
        conv.reply("the cat sat " * 40)
    assert conv.messages == before


def test_overflow_through_the_cli(cli, ws, monkeypatch, tmp_path):
    lines = [f"turn {i} the dog" for i in range(8)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    r = cli("-w", ws.root, "chat", "--model", ws.short, "--system", "be kind", "--temperature", "0",
            "--max-tokens", "8", "--json", *keep_context(tmp_path))
    assert r.code == 0, r.stderr
    msgs = r.json()["messages"]
    assert msgs[0] == {"role": "system", "content": "be kind"}
    users = [m["content"] for m in msgs if m["role"] == "user"]
    assert users[-1] == lines[-1] and lines[0] not in users and len(users) < 8


def test_stream_decoder_keeps_multibyte_characters_whole(ws):
    tok = Tokenizer(ws.root / "models/sft")
    text = "the cät sat — 日本語 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte tokens here
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens were held back until their character was complete


def test_default_model_choice(tmp_path):
    ws = Workspace(tmp_path / "ws")

    def fake(name, created, **meta):
        d = ws.root / "models" / name
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"kind": "model", "created": created, **meta}))

    with pytest.raises(PrefcliError, match="no chat model") as e:
        default_model(ws)
    assert "prefcli align --method sft" in e.value.hint
    fake("base", "2025-01-01T00:00:05+00:00", stage="pretrain", chat=False)
    fake("sft", "2025-01-01T00:00:01+00:00", stage="align sft", chat=True)
    assert default_model(ws)[0] == "sft"
    fake("dpo", "2025-01-01T00:00:02+00:00", stage="align dpo", chat=True)
    fake("sft2", "2025-01-01T00:00:09+00:00", stage="align sft", chat=True)  # newer, but only SFT
    fake("rm", "2025-01-01T00:00:09+00:00", stage="reward", chat=True, **{"kind": "reward_model"})
    assert default_model(ws) == ("dpo", "the newest aligned policy")
    fake("grpo", "2025-01-01T00:00:03+00:00", stage="align grpo", chat=True)
    assert default_model(ws)[0] == "grpo"


def test_settings_and_message_files(tmp_path):
    s = Sampling()
    s.set("top-p", "0.5")
    s.set("max_tokens", "7")
    assert (s.top_p, s.max_tokens) == (0.5, 7)
    for name, value, msg in [("temperature", "-1", "0 \\(greedy\\) or more"), ("top_p", "0", "in \\(0, 1\\]"),
                             ("top_k", "2.5", "not a whole number"), ("max_tokens", "0", "at least 1"),
                             ("speed", "3", "unknown setting 'speed'"), ("temperature", "hot", "not a number")]:
        with pytest.raises(PrefcliError, match=msg):
            s.set(name, value)

    good = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    f = tmp_path / "c.json"
    f.write_text(json.dumps(good))
    assert read_messages(str(f)) == good
    f.write_text(json.dumps({"model": "x", "messages": good}))  # what --json prints loads too
    assert read_messages(str(f)) == good
    for doc, msg in [("[1, 2", "not valid JSON \\(line 1"), ('{"a": 1}', "expected a list of messages"),
                     ('[{"role": "bot", "content": "x"}]', "message 1 has role 'bot'"),
                     ('[{"role": "user"}]', "message 1 is not an object with string 'role' and 'content'"),
                     (json.dumps(good[1:] + good[:1]), "message 3 is a system message")]:
        f.write_text(doc)
        with pytest.raises(PrefcliError, match=msg):
            read_messages(str(f))
    with pytest.raises(PrefcliError, match="no such file"):
        read_messages(str(tmp_path / "missing.json"))


def test_errors_are_one_line(cli, ws, tmp_path):
    for args, msg in [(("--model", "nope"), "--model: no model named 'nope'"),
                      (("--top-p", "2"), "--top-p: 2.0 must be in (0, 1]"),
                      (("--max-tokens", "0"), "--max-tokens: 0 must be at least 1"),
                      (("--model", str(ws.root / "tokenizers/default")), "no config.json")]:
        r = cli("-w", ws.root, "chat", "--prompt", "hi", *args)
        assert r.code == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert r.stdout == ""
    r = cli("-w", tmp_path / "empty", "chat", "--prompt", "hi")
    assert r.code == 2 and "no chat model" in r.stderr and "prefcli align --method sft" in r.stderr


# ----------------------------------------------------------------------------- the REPL

def test_repl_through_a_terminal(ws, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    saved = tmp_path / "conv.json"
    env = dict(os.environ, TERM="dumb", NO_COLOR="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    child = pexpect.spawn(sys.executable, ["-m", "prefcli", "-w", str(ws.root), "chat", "--temperature", "0",
                                           "--max-tokens", "12"],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 300))
    try:
        child.expect("model: sft")
        child.expect("you> ")
        child.sendline("/system be brief")
        child.expect("system prompt set")
        child.expect("you> ")
        for text in ("the cat sat", "and the dog"):
            child.sendline(text)
            child.expect(r"sft> ")
            child.expect(r"\[12 tokens, \d+ tokens/s\]")
            child.expect("you> ")
        child.sendline("/set top_p 7")
        child.expect(r"error: /set top_p: 7 must be in \(0, 1\]")
        child.expect("you> ")
        child.sendline("/load " + str(tmp_path / "missing.json"))
        child.expect("error: /load .*no such file")
        child.expect("you> ")
        child.sendline("/set max_tokens 5000")
        child.expect("max_tokens = 5000")
        child.expect("you> ")
        # A reply of ~4000 tokens (the stop tokens never win): Ctrl-C as soon as it starts.
        child.sendline("a bird")
        child.expect("sft> ")
        child.expect(r"\S")
        child.sendintr()
        child.expect(r"\[(\d+) tokens?, \d+ tokens/s; stopped: the partial reply stays in the history\]")
        stopped_at = int(child.match.group(1))
        child.expect("you> ")
        child.sendline("/save " + str(saved))
        child.expect("saved 7 messages")
        child.expect("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0

    msgs = json.loads(saved.read_text())
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 3
    assert msgs[0]["content"] == "be brief" and msgs[5]["content"] == "a bird"
    conv = conversation(ws)
    # Turns typed at the terminal got the replies a fresh prefill gives (the cache carried over).
    assert msgs[2]["content"] == fresh_text(conv, msgs[:2], 12)
    assert msgs[4]["content"] == fresh_text(conv, msgs[:4], 12)
    # The stopped reply was kept: the start of what it would have said.
    assert 0 < stopped_at < 4000 and msgs[6]["content"]
    partial, full = msgs[6]["content"].rstrip("\ufffd"), fresh_text(conv, msgs[:6], 200).rstrip("\ufffd")
    n = min(len(partial), len(full))
    assert partial[:n] == full[:n]


def test_hf_folder_with_its_own_template_and_one_without(cli, ws, tmp_path):
    """An HF-style folder (no meta.json): its own Jinja template (ChatML, which renders a newline
    after each turn's end) carries the cache over just as well; without a template it chats raw."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(ws.root / "models/sft", hf)
    (hf / "meta.json").unlink()
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    conv = conversation(ws, hf, max_tokens=6)
    assert not conv.raw
    previous = []
    for text in ["the cat sat", "and the dog", "a bird"]:
        expected = fresh_greedy(conv, conv.messages + [{"role": "user", "content": text}], 6)
        r = conv.reply(text)
        assert r.tokens == expected
        ids = conv.prompt_ids(conv.messages[:-1])
        assert r.prefilled <= len(ids) - len(previous) + 1  # the previous prompt came from the cache
        previous = ids

    del cfg["chat_template"]
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = cli("-w", ws.root, "chat", "--model", hf, "--prompt", "the cat", "--temperature", "0", "--max-tokens", "5", "--json")
    assert r.code == 0, r.stderr
    assert "no chat template" in r.stderr and r.json()["raw"] is True
