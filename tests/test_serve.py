"""`prefcli serve`: the official openai client against a server on a free 127.0.0.1 port.

Greedy replies equal `prefcli chat --temperature 0`, requests decoded together still give
each its own reply, a client that goes away frees its slot, a full queue answers 429,
every mistake comes back in OpenAI's error shape. Every request and wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")  # the `dev` extra; the server itself needs the `serve` extra
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from prefcli.cli import main  # noqa: E402
from prefcli.generate import generate  # noqa: E402
from prefcli.model import Transformer, make_config  # noqa: E402
from prefcli.artifacts import save_model_artifact, sync_token_ids  # noqa: E402
from prefcli.stages.serve import MISSING_EXTRA, ServeConfig, load_models  # noqa: E402
from prefcli.steer import Steering  # noqa: E402
from prefcli.tokenizer import Tokenizer  # noqa: E402
from prefcli.workspace import Workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "the cat sat on the mat"}]
WAIT = 20  # seconds any single wait may take before the test fails


def _random_model(tok: Tokenizer, seed: int, *, reward: bool = False) -> Transformer:
    """Random weights with peaked, varied greedy choices; the stop tokens' head rows are zero, so
    greedy replies never stop early (the best of ~300 random logits beats their 0)."""
    cfg = make_config("tiny", tok.vocab_size, layers=2, dim=32, heads=4, context=256, tie_word_embeddings=False)
    model = Transformer(cfg, lm_head=not reward, score_head=reward).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=g))
        if not reward:
            model.lm_head.weight[tok.stop_ids()] = 0
    sync_token_ids(model, tok)
    return model


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """chat (a chat model), base (chat: false), rm (a reward model), steer (chat + steering)."""
    root = tmp_path_factory.mktemp("serve")
    rng = random.Random(0)
    words = "the cat sat on a mat with the dog and a bird in the old town shop near river baker".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(25)) for _ in range(300)) + "\n")
    w = Workspace(root / "ws")
    try:
        main(["-w", str(w.root), "tokenize", "-i", str(corpus), "--vocab-size", "300"])
    except SystemExit as e:
        assert not e.code
    tok_dir = w.root / "tokenizers/default"
    tok = Tokenizer(tok_dir)

    def save(name, model, chat, kind="causal_lm", extra_files=None):
        save_model_artifact(w, name, model, tok_dir, kind=kind, stage="test", config={}, parents=[], metrics={},
                            overwrite=False, chat=chat, extra_files=extra_files)

    steering = Steering(["polite", "concise"], 32)
    with torch.no_grad():
        steering.proj.weight.copy_(torch.randn(steering.proj.weight.shape, generator=torch.Generator().manual_seed(9)))
    save("chat", _random_model(tok, 0), True)
    save("base", _random_model(tok, 1), False)
    save("rm", _random_model(tok, 2, reward=True), False, kind="reward")
    save("steer", _random_model(tok, 3), True, extra_files=steering.save)
    w.steering = steering
    return w


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """create_app on a uvicorn thread at 127.0.0.1:<free port>; .models gives the engines."""

    def __init__(self, ws: Workspace, api_key: str | None = None, **options):
        from prefcli.server.app import create_app

        self.lines: list[str] = []
        self.models = load_models(ServeConfig(model=["chat", "base", "rm", "steer"], device="cpu", **options), ws)
        app = create_app(self.models, api_key, log=self.lines.append)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        until(lambda: self.server.started, "the server to start")

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), timeout=WAIT,
                             max_retries=0, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT)
        for m in self.models.values():
            if m.engine is not None:
                m.engine.stop()


def until(condition, what: str, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(ws):
    s = Server(ws)
    yield s
    s.close()


def gate(engine, monkeypatch) -> threading.Event:
    """Hold the engine's decode steps until the returned event is set (requests still join the queue)."""
    opened = threading.Event()
    step = engine._step

    def gated():
        opened.wait(WAIT)
        step()

    monkeypatch.setattr(engine, "_step", gated)
    return opened


def greedy(model: Transformer, tok: Tokenizer, messages: list[dict], n: int, offset=None) -> str:
    ids = tok.chat_ids(messages, add_generation_prompt=True)
    out = generate(model, [ids], max_new_tokens=n, temperature=0, stop_ids=tok.stop_ids(), embed_offset=offset)[0]
    return tok.decode(out.tokens)


# ----------------------------------------------------------------------------- chat

def test_greedy_chat_equals_prefcli_chat_plain_and_streamed(server, ws, cli):
    c = server.client()
    r = c.chat.completions.create(model="chat", messages=QUESTION, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.model == "chat"
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    prompt_len = len(Tokenizer(ws.root / "models/chat").chat_ids(QUESTION, add_generation_prompt=True))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 24, prompt_len + 24)

    out = cli("-w", ws.root, "chat", "--model", "chat", "--temperature", "0", "--max-tokens", "24",
              "--prompt", QUESTION[0]["content"])
    assert out.code == 0, out.stderr
    assert out.stdout == text + "\n" and len(text) > 10

    stream = c.chat.completions.create(model="chat", messages=QUESTION, temperature=0, max_tokens=24, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 3  # really streamed
    assert any(f'"POST /v1/chat/completions" 200' in line and f"prompt={prompt_len} completion=24" in line
               for line in server.lines)


def test_sse_ends_with_done(server):
    req = urllib.request.Request(server.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "chat", "messages": QUESTION, "max_tokens": 3,
                                                  "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_n_choices_and_seed(server):
    c = server.client()
    r = c.chat.completions.create(model="chat", messages=QUESTION, n=3, temperature=1.0, max_tokens=12, seed=5)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in r.choices]
    assert len(set(texts)) == 3  # each choice samples on its own
    again = c.chat.completions.create(model="chat", messages=QUESTION, n=3, temperature=1.0, max_tokens=12, seed=5)
    assert [ch.message.content for ch in again.choices] == texts  # a seed makes it repeatable
    one = c.chat.completions.create(model="chat", messages=QUESTION, temperature=1.0, max_tokens=12, seed=5)
    assert one.choices[0].message.content == texts[0]  # choice j draws with seed + j
    assert [ch.finish_reason for ch in r.choices] == ["length"] * 3 and r.usage.completion_tokens == 36

    stream = c.chat.completions.create(model="chat", messages=QUESTION, n=2, temperature=1.0, max_tokens=12, seed=5,
                                       stream=True)
    got = {0: "", 1: ""}
    for ch in stream:
        for choice in ch.choices:
            got[choice.index] += choice.delta.content or ""
    assert [got[0], got[1]] == texts[:2]


def test_stop_sequences(server):
    c = server.client()
    full = c.chat.completions.create(model="chat", messages=QUESTION, temperature=0, max_tokens=40).choices[0].message.content
    stop = full[12:15]
    expected = full[:full.find(stop)]
    r = c.chat.completions.create(model="chat", messages=QUESTION, temperature=0, max_tokens=40, stop=[stop, "\x00"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    stream = c.chat.completions.create(model="chat", messages=QUESTION, temperature=0, max_tokens=40, stop=stop,
                                       stream=True)
    chunks = [ch for ch in stream if ch.choices]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_on_a_base_model_equal_chat_raw(server, ws, cli):
    c = server.client()
    r = c.completions.create(model="base", prompt="the cat sat", temperature=0, max_tokens=16)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    out = cli("-w", ws.root, "chat", "--model", "base", "--temperature", "0", "--max-tokens", "16", "--prompt", "the cat sat")
    assert out.code == 0 and out.stdout == r.choices[0].text + "\n"
    two = c.completions.create(model="base", prompt=["the cat sat", "a dog"], temperature=0, max_tokens=16)
    assert [ch.index for ch in two.choices] == [0, 1] and two.choices[0].text == r.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="base", messages=QUESTION)
    assert e.value.body["code"] == "wrong_model_kind" and "/v1/completions" in e.value.body["message"]


def test_models_and_health(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert set(models) == {"chat", "base", "rm", "steer"}
    assert models["rm"].model_extra["kind"] == "reward" and models["chat"].model_extra["context_length"] == 256
    assert models["steer"].model_extra["steering"] == {"polite": 1.0, "concise": 1.0}
    with urllib.request.urlopen(server.url + "/health", timeout=WAIT) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "ok" and doc["models"]["chat"] == {"kind": "chat", "active": 0, "queued": 0}


# ----------------------------------------------------------------------------- batching

def test_concurrent_requests_decode_in_one_batch_with_their_own_replies(server, monkeypatch):
    c = server.client()
    prompts = [[{"role": "user", "content": t}] for t in ("the cat", "a dog in the old town", "bird", "near river")]
    alone = [c.chat.completions.create(model="chat", messages=m, temperature=0, max_tokens=20).choices[0].message.content
             for m in prompts]
    engine = server.models["chat"].engine
    opened = gate(engine, monkeypatch)
    engine.max_rows = 0
    results = [None] * 4

    def ask(i):
        results[i] = c.chat.completions.create(model="chat", messages=prompts[i], temperature=0, max_tokens=20)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    threads[0].start()
    until(lambda: engine.active == 1, "the first request to join")
    for t in threads[1:]:
        t.start()
    until(lambda: engine.queued == 3, "three requests queued behind it")
    opened.set()
    for t in threads:
        t.join(WAIT)
    assert engine.max_rows == 4  # the three joined the running batch
    assert [r.choices[0].message.content for r in results] == alone, [(r.choices[0].finish_reason, r.usage.completion_tokens, r.choices[0].message.content) for r in results]


def test_disconnect_mid_stream_frees_the_slot(server, monkeypatch):
    engine = server.models["chat"].engine
    step = engine._step

    def slow():
        time.sleep(0.005)
        step()

    monkeypatch.setattr(engine, "_step", slow)  # 200 tokens would take over a second
    before = engine.steps
    stream = server.client().chat.completions.create(model="chat", messages=QUESTION, temperature=0, max_tokens=200,
                                                      stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    until(lambda: engine.active == 0, "the slot to be freed", timeout=5)
    assert engine.steps - before < 100
    until(lambda: "client disconnected" in server.lines[-1], "its log line")
    assert int(server.lines[-1].split("after ")[1].split()[0]) < 100


def test_full_queue_answers_429(ws, monkeypatch):
    s = Server(ws, max_batch=1, max_queue=1)
    try:
        engine = s.models["chat"].engine
        opened = gate(engine, monkeypatch)
        c = s.client()
        results = []

        def ask():
            results.append(c.chat.completions.create(model="chat", messages=QUESTION, max_tokens=5))

        first, second = threading.Thread(target=ask), threading.Thread(target=ask)
        first.start()
        until(lambda: engine.active == 1, "the first request to run")
        second.start()
        until(lambda: engine.queued == 1, "the second to wait")
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="chat", messages=QUESTION, max_tokens=5)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        opened.set()
        first.join(WAIT), second.join(WAIT)
        assert len(results) == 2
    finally:
        s.close()


# ----------------------------------------------------------------------------- scores and steering

def test_score_equals_prefcli_reward_score(server, ws, cli):
    pairs = [{"prompt": "What is two plus three?", "response": "Five."},
             {"prompt": [{"role": "user", "content": "Who runs the bakery?"}], "response": "Ben runs it."}]
    status, doc = post(server.url + "/v1/score", {"model": "rm", "pairs": pairs})
    assert status == 200 and [d["index"] for d in doc["data"]] == [0, 1]
    for pair, d in zip(pairs, doc["data"]):
        prompt = pair["prompt"] if isinstance(pair["prompt"], str) else pair["prompt"][0]["content"]
        out = cli("-w", ws.root, "reward", "score", "--model", "rm", "--prompt", prompt, "--response", pair["response"])
        assert out.code == 0, out.stderr
        assert abs(float(out.stdout) - d["score"]) < 1e-4
    assert doc["data"][0]["score"] != doc["data"][1]["score"]
    status, doc = post(server.url + "/v1/score", {"model": "chat", "pairs": pairs})
    assert status == 400 and doc["error"]["code"] == "wrong_model_kind"


def test_prefer_steers_a_steerable_model(server, ws):
    c = server.client()
    loaded = server.models["steer"].loaded
    default = c.chat.completions.create(model="steer", messages=QUESTION, temperature=0, max_tokens=16)
    assert default.choices[0].message.content == greedy(loaded.model, loaded.tokenizer, QUESTION, 16)
    steered = c.chat.completions.create(model="steer", messages=QUESTION, temperature=0, max_tokens=16,
                                        extra_body={"prefer": {"polite": 0}})
    offset = ws.steering.offset({"polite": 0})
    assert steered.choices[0].message.content == greedy(loaded.model, loaded.tokenizer, QUESTION, 16, offset)
    assert steered.choices[0].message.content != default.choices[0].message.content
    as_text = c.chat.completions.create(model="steer", messages=QUESTION, temperature=0, max_tokens=16,
                                        extra_body={"prefer": "polite=0"})
    assert as_text.choices[0].message.content == steered.choices[0].message.content
    for model, prefer, says in (("steer", {"rude": 1}, "unknown attribute 'rude'"),
                                ("steer", {"polite": "x"}, "not a number"),
                                ("chat", {"polite": 0}, "no steering weights")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=model, messages=QUESTION, extra_body={"prefer": prefer})
        assert e.value.body["param"] == "prefer" and says in e.value.body["message"]


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("body, param, says", [
    ({"model": "chat", "messages": QUESTION, "temperature": -1}, "temperature", "out of range"),
    ({"model": "chat", "messages": QUESTION, "top_p": 0}, "top_p", "out of range"),
    ({"model": "chat", "messages": QUESTION, "max_tokens": 0}, "max_tokens", "1 or more"),
    ({"model": "chat", "messages": QUESTION, "n": 0}, "n", "out of range"),
    ({"model": "chat", "messages": QUESTION, "n": "two"}, "n", "not a whole number"),
    ({"model": "chat", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": "chat", "messages": QUESTION, "stream": "yes"}, "stream", "true or false"),
    ({"model": "chat", "messages": []}, "messages", "non-empty list"),
    ({"model": "chat", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "not one of"),
    ({"model": "chat", "messages": [{"role": "user", "content": 3}]}, "messages[0].content", "a string"),
    ({"model": "chat", "messages": [{"role": "user", "content": "the cat " * 200}]}, "messages", "holds 256"),
    ({"model": "base", "prompt": 7}, "prompt", "a string or a non-empty list"),
    ({"model": "chat", "messages": QUESTION, "logprobs": True}, "logprobs", "not supported"),
])
def test_bad_parameters_answer_400_in_openai_shape(server, body, param, says):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    status, doc = post(server.url + path, body)
    assert status == 400, doc
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["param"] == param
    assert says in doc["error"]["message"]


def test_bad_json_unknown_model_and_route(server):
    for raw in (b"{not json", b"[1, 2]"):
        status, doc = post(server.url + "/v1/chat/completions", raw)
        assert status == 400 and doc["error"]["code"] == "invalid_json"
    status, doc = post(server.url + "/v1/chat/completions", {"model": "gpt-4", "messages": QUESTION})
    assert status == 404 and doc["error"]["code"] == "model_not_found" and "chat, base, rm, steer" in doc["error"]["message"]
    status, doc = post(server.url + "/v1/nothing", {})
    assert status == 404 and set(doc["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:  # the client raises it with the body
        server.client().chat.completions.create(model="chat", messages=QUESTION, temperature=3)
    assert e.value.body["param"] == "temperature"


# ----------------------------------------------------------------------------- the command

def test_cli_serve_with_api_key_from_env(ws):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFCLI_API_KEY": "s3cret"}
    proc = subprocess.Popen([sys.executable, "-m", "prefcli", "-w", str(ws.root), "serve", "--model", "chat",
                             "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return post(url + "/v1/chat/completions", b"{}")[0] == 401
            except OSError:
                return False

        until(up, "prefcli serve to answer", timeout=60)
        status, doc = post(url + "/v1/chat/completions", {"messages": QUESTION},
                           headers={"Authorization": "Bearer wrong"})
        assert status == 401 and doc["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", timeout=WAIT, max_retries=0)
        r = good.chat.completions.create(model="chat", messages=QUESTION, temperature=0, max_tokens=5)
        assert r.usage.completion_tokens == 5
        assert "".join(ch.choices[0].delta.content or "" for ch in good.chat.completions.create(
            model="chat", messages=QUESTION, temperature=0, max_tokens=5, stream=True) if ch.choices) == r.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", timeout=WAIT, max_retries=0).models.list()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=WAIT)
    assert f"OpenAI base URL: http://127.0.0.1:{port}/v1 (API key required)" in err
    assert "s3cret" not in err
    assert '"POST /v1/chat/completions" 401' in err and '"POST /v1/chat/completions" 200' in err


def test_cli_errors_are_one_line(ws, cli, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = cli("-w", ws.root, "serve", "--model", "chat", "--port", busy.getsockname()[1])
    assert out.code == 2 and "cannot listen there" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = cli("-w", ws.root, "serve")
    assert out.code == 2 and "needs at least one --model" in out.stderr
    out = cli("-w", ws.root, "serve", "--model", "nothing", "--port", _free_port())
    assert out.code == 2 and "no model named 'nothing'" in out.stderr
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    out = cli("-w", ws.root, "serve", "--model", "chat")
    assert out.code == 2 and out.stderr.strip() == f"error: {MISSING_EXTRA}"


def test_engine_joining_and_leaving_equals_generate(ws):
    """Prompts of different lengths join a running batch at different steps and leave at different
    lengths (max_tokens); each reply equals generating it alone, and the batch really held them together."""
    from prefcli.server.engine import BatchEngine, Job

    tok = Tokenizer(ws.root / "models/chat")
    model = _random_model(tok, 0)
    prompts = [tok.chat_ids([{"role": "user", "content": " ".join(["cat"] * k)}], add_generation_prompt=True)
               for k in (1, 9, 3, 20, 5, 5)]
    budgets = [12, 30, 7, 25, 30, 18]
    alone = [generate(model, [p], max_new_tokens=n, temperature=0, stop_ids=tok.stop_ids())[0].tokens
             for p, n in zip(prompts, budgets)]
    engine = BatchEngine(model, max_batch=4, max_queue=8)
    try:
        jobs = [Job(p, n, temperature=0, stop_ids=tok.stop_ids()) for p, n in zip(prompts, budgets)]
        engine.submit(jobs[:2])
        until(lambda: engine.steps >= 3, "a few steps")
        engine.submit(jobs[2:])
        until(lambda: all(j.done for j in jobs), "every job")
    finally:
        engine.stop()
    assert [j.tokens for j in jobs] == alone and [j.finish_reason for j in jobs] == ["length"] * 6
    assert engine.max_rows == 4 and engine.active == 0
