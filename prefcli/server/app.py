"""The HTTP layer of `prefcli serve`: OpenAI's chat/completions API over BatchEngine.

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/score (reward
models), GET /v1/models, GET /health. Request bodies are checked by hand (not by pydantic)
so every mistake comes back in OpenAI's error shape, naming the field:
{"error": {"message", "type", "param", "code"}}.

A request becomes n engine jobs; their tokens come back through an asyncio queue, are
decoded incrementally (the chat REPL's StreamDecoder), cut at `stop` strings, and sent as
one JSON reply or as server-sent events ending in `data: [DONE]`. A client that goes
away cancels its jobs: they leave the batch before the next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefcli.chat_format import ROLES
from prefcli.errors import PrefcliError
from prefcli.server.engine import BatchEngine, Job, QueueFull
from prefcli.stages.chat import StreamDecoder
from prefcli.stages.common import Loaded
from prefcli.steer import Steering

MAX_STOP = 4  # stop strings per request, as OpenAI allows


@dataclass
class ServedModel:
    """A model the server answers for. kind: "chat" (chat template), "base" (completions only) or "reward"."""

    name: str
    loaded: Loaded
    kind: str
    engine: BatchEngine | None = None  # generative models
    steering: Steering | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)  # reward scoring, one batch at a time

    @property
    def context(self) -> int:
        if self.engine is not None:
            return self.engine.max_len
        return self.loaded.model.config.max_position_embeddings


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ----------------------------------------------------------------------------- request checks

def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name}: {value!r} is not a number", name)
    if value < low or value > high or (low_open and value == low):
        raise APIError(400, f"{name}: {value} is out of range; it must be in {'(' if low_open else '['}{low:g}, {high:g}]", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name}: {value!r} is not a whole number", name)
    if value < low or (high is not None and value > high):
        raise APIError(400, f"{name}: {value} is out of range; it must be {low} or more"
                       + (f" and at most {high}" if high is not None else ""), name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop: must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    return [s for s in stops if s]


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where}: must be an object with role and content", where)
        role, content = m.get("role"), m.get("content")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise APIError(400, f"{where}.role: {role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                               f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content: must be a string", f"{where}.content")
        out.append({"role": role, "content": content})
    return out


@dataclass
class Settings:
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    offset: torch.Tensor | None


def _settings(body: dict, served: ServedModel) -> Settings:
    for name in ("logprobs", "echo", "top_logprobs", "tools", "functions", "suffix"):
        if body.get(name):
            raise APIError(400, f"{name}: not supported by prefcli serve", name)
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    max_tokens = _integer(body, "max_tokens", max_tokens, 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream: must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options: must be an object", "stream_options")
    return Settings(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0),
        n=_integer(body, "n", 1, 1, min(served.engine.max_batch, served.engine.max_queue)),
        stop=_stops(body),
        seed=_integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        offset=_offset(body, served),
    )


def _offset(body: dict, served: ServedModel) -> torch.Tensor | None:
    """A steerable model's preference vector from the extra field `prefer` ({"polite": 0} or "polite=0")."""
    prefer = body.get("prefer")
    if prefer is None:
        return None
    if served.steering is None:
        raise APIError(400, f"prefer: {served.name} has no steering weights (only models made by "
                       "`prefcli align --method steer` take a preference vector)", "prefer")
    try:
        if isinstance(prefer, str):
            prefs = served.steering.parse(prefer, "prefer")
        elif isinstance(prefer, dict):
            prefs = served.steering.parse(",".join(f"{k}={v}" for k, v in prefer.items()), "prefer") if prefer else {}
        else:
            raise APIError(400, 'prefer: must be an object such as {"polite": 0} or a string such as "polite=0"', "prefer")
    except PrefcliError as e:
        raise APIError(400, str(e), "prefer") from None
    return served.steering.offset(prefs)


# ----------------------------------------------------------------------------- the text of a choice

class ChoiceText:
    """A choice's tokens in, text out: decoded incrementally and cut at the first stop string.

    Text that could be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, served: ServedModel, stops: list[str]):
        self.decoder = StreamDecoder(served.loaded.tokenizer)
        self.stop_ids = set(served.loaded.tokenizer.stop_ids(chat=served.kind == "chat"))
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.tokens = 0
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        """Text that can be sent after this token ("" if none)."""
        self.tokens += 1
        if token in self.stop_ids:
            return ""
        self.text += self.decoder.push(token)
        return self._ready(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._ready(final=True)

    def whole(self) -> str:
        """The final text: the reply decoded in one go (as `prefcli chat` does), or cut at a stop string."""
        if self.stopped:
            return self.text
        ids = self.decoder.ids
        return self.decoder.tok.decode(ids[:-1] if ids and ids[-1] in self.stop_ids else ids)

    def _ready(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stops:
            start = max(0, self.sent - self.hold)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.stopped = True
                final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece


# ----------------------------------------------------------------------------- running a request

class Run:
    """The jobs of one request and the queue their events arrive on (in the server's event loop)."""

    def __init__(self, served: ServedModel, prompts: list[list[int]], s: Settings):
        self.served = served
        self.loop = asyncio.get_running_loop()
        # Events from the engine thread: appended there, read here. The loop is woken once per
        # batch of events, not once per token (each wake-up is a write to the loop's self-pipe).
        self.events: deque[tuple[int, int | None]] = deque()
        self.ready = asyncio.Event()
        self.wake_pending = False
        stop_ids = served.loaded.tokenizer.stop_ids(chat=served.kind == "chat")
        self.jobs, self.texts = [], []
        for prompt in prompts:
            budget = served.engine.max_len - len(prompt)
            max_tokens = budget if s.max_tokens is None else min(s.max_tokens, budget)
            group = object()  # the n choices of one prompt are prefilled once
            for j in range(s.n):
                seed = None if s.seed is None else (s.seed + j) % 2 ** 63  # choice j: seed + j, so choices differ
                self.jobs.append(Job(prompt, max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                     stop_ids=stop_ids, seed=seed, embed_offset=s.offset, group=group,
                                     on_event=self._on_event))
                self.texts.append(ChoiceText(served, s.stop))
        self.index = {id(job): i for i, job in enumerate(self.jobs)}
        self.prompt_tokens = sum(len(p) for p in prompts)

    def _on_event(self, job: Job, token: int | None) -> None:  # engine thread
        self.events.append((self.index[id(job)], token))
        if not self.wake_pending:
            self.wake_pending = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # event loop
        self.wake_pending = False
        self.ready.set()

    def start(self) -> None:
        try:
            self.served.engine.submit(self.jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; try again shortly", None, "queue_full",
                           "rate_limit_error") from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        self.served.engine.wake()

    @property
    def completion_tokens(self) -> int:
        return sum(t.tokens for t in self.texts)

    def finish_reason(self, i: int) -> str:
        if self.texts[i].stopped:
            return "stop"
        job = self.jobs[i]
        if job.finish_reason == "error":
            raise APIError(500, f"generation failed: {job.error}", None, "server_error", "server_error")
        return "length" if job.finish_reason == "length" else "stop"

    async def _next_events(self) -> list[tuple[int, int | None]]:
        """Every event that has arrived (waiting for one if none has)."""
        while not self.events:
            self.ready.clear()
            if not self.events:
                await self.ready.wait()
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out

    async def pieces(self):
        """(choice, text) as tokens arrive, then (choice, None) when the choice is done.

        Tokens that arrived together go out as one piece per choice (one SSE chunk, not one per
        token): when the event loop falls behind the engine, it catches up in fewer sends.
        """
        left = len(self.jobs)
        while left:
            ready: dict[int, str] = {}
            done: list[int] = []
            for i, token in await self._next_events():
                text = self.texts[i]
                if token is None:
                    ready[i] = ready.get(i, "") + text.finish()
                    done.append(i)
                    continue
                if text.stopped:
                    continue
                ready[i] = ready.get(i, "") + text.push(token)
                if text.stopped:
                    self.jobs[i].cancel()
                    self.served.engine.wake()
            for i, piece in ready.items():
                if piece:
                    yield i, piece
            for i in done:
                yield i, None
            left -= len(done)


async def _until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ----------------------------------------------------------------------------- the app

def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class AuthAndLog:
    """ASGI middleware: with an API key, every request needs `Authorization: Bearer KEY` (401
    otherwise); every request leaves one log line (client, method, path, status, seconds, and
    what the endpoint put in request.state.log), written when its response is complete."""

    def __init__(self, app, api_key: str | None, log):
        self.app, self.api_key, self.log = app, api_key, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]
        state = scope.setdefault("state", {})

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    response = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                        None, "invalid_api_key", "authentication_error").response()
                    return await response(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            client = (scope.get("client") or ("-",))[0]
            extra = state.get("log", "")
            self.log(f"{client} \"{scope['method']} {scope['path']}\" {status[0]} {time.perf_counter() - start:.3f}s"
                     + (f" {extra}" if extra else ""))


def create_app(models: dict[str, ServedModel], api_key: str | None = None, log=None) -> FastAPI:
    """The FastAPI app serving these models. log(line): one line per request (default: stderr)."""
    app = FastAPI(title="prefcli serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        request.state.log = f"error={e.code or e.type}" + (f" param={e.param}" if e.param else "")
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message, None, code).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        return APIError(500, f"internal error: {type(e).__name__}: {e}", None, "server_error", "server_error").response()

    app.add_middleware(AuthAndLog, api_key=api_key, log=log or _stderr)

    async def _body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        return body

    def _model(body: dict, endpoint: str) -> ServedModel:
        name = body.get("model")
        if name is None and len(models) == 1:
            return next(iter(models.values()))
        if name not in models:
            raise APIError(404, f"model {name!r} is not served here; served: {', '.join(models)}", "model",
                           "model_not_found")
        served = models[name]
        wants = {"chat": ("chat",), "completions": ("chat", "base"), "score": ("reward",)}[endpoint]
        if served.kind not in wants:
            use = {"reward": "POST /v1/score", "base": "POST /v1/completions",
                   "chat": "POST /v1/chat/completions"}[served.kind]
            what = {"reward": "a reward model", "base": "not a chat model (no chat template)", "chat": "a chat model"}
            raise APIError(400, f"model {name!r} is {what[served.kind]}: use {use}", "model", "wrong_model_kind")
        return served

    def _check_length(served: ServedModel, prompt: list[int], what: str, param: str, hint: str) -> None:
        if len(prompt) >= served.context:
            raise APIError(400, f"{what} {len(prompt)} tokens; model {served.name!r} holds {served.context} "
                           f"(prompt and reply together): {hint}", param, "context_length_exceeded")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {
            name: {"kind": m.kind, "active": m.engine.active if m.engine else 0, "queued": m.engine.queued if m.engine else 0}
            for name, m in models.items()}}

    @app.get("/v1/models")
    async def list_models():
        data = []
        for name, m in models.items():
            item = {"id": name, "object": "model", "created": m.created, "owned_by": "prefcli", "kind": m.kind,
                    "context_length": m.context}
            if m.steering is not None:
                item["steering"] = dict(zip(m.steering.attributes, m.steering.defaults.tolist()))
            data.append(item)
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        served = _model(body, "chat")
        s = _settings(body, served)
        messages = _messages(body)
        try:
            prompt = served.loaded.tokenizer.chat_ids(messages, add_generation_prompt=True)
        except PrefcliError as e:
            raise APIError(400, f"messages: the chat template cannot render them ({e.message})", "messages") from None
        _check_length(served, prompt, "the messages are", "messages", "send fewer or shorter messages")
        return await _respond(request, served, [prompt], s, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        served = _model(body, "completions")
        s = _settings(body, served)
        texts = body.get("prompt")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "prompt: must be a string or a non-empty list of strings", "prompt")
        tok = served.loaded.tokenizer
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id  # as `prefcli chat --raw` does
        prompts = [([start] if start is not None else []) + tok.encode(t) for t in texts]
        for i, p in enumerate(prompts):
            if not p:
                raise APIError(400, f"prompt[{i}]: is empty", "prompt")
            _check_length(served, p, f"prompt {i} is" if len(prompts) > 1 else "the prompt is", "prompt",
                          "send a shorter prompt")
        return await _respond(request, served, prompts, s, chat=False)

    async def _respond(request: Request, served: ServedModel, prompts: list[list[int]], s: Settings, chat: bool):
        run = Run(served, prompts, s)
        run.start()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            request.state.log = f"model={served.name} prompt={run.prompt_tokens} completion={run.completion_tokens}"
            return {"prompt_tokens": run.prompt_tokens, "completion_tokens": run.completion_tokens,
                    "total_tokens": run.prompt_tokens + run.completion_tokens}

        if s.stream:
            def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
                if chat:
                    delta = ({"role": "assistant", "content": ""} if first else
                             {} if text is None else {"content": text})
                    choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
                doc = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                       "model": served.name, "choices": [choice]}
                if s.include_usage:
                    doc["usage"] = None
                return f"data: {json.dumps(doc)}\n\n"

            async def events():
                try:
                    if chat:
                        for i in range(len(run.jobs)):
                            yield chunk(i, None, None, first=True)
                    async for i, piece in run.pieces():
                        yield chunk(i, piece, None if piece is not None else run.finish_reason(i))
                    if s.include_usage:
                        doc = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                               "model": served.name, "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(doc)}\n\n"
                    else:
                        usage()
                    yield "data: [DONE]\n\n"
                except APIError as e:  # the headers are sent: the error goes in the stream
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': e.param, 'code': e.code}})}\n\n"
                finally:
                    run.cancel()  # the client went away (or we are done): free the slots now

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        watcher = asyncio.ensure_future(_until_disconnect(request))
        try:
            async def collect():
                async for _ in run.pieces():
                    pass

            collector = asyncio.ensure_future(collect())
            await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not collector.done():  # the client is gone: nobody to answer
                collector.cancel()
                request.state.log = f"model={served.name} client disconnected"
                return JSONResponse({}, status_code=499)
            collector.result()
        finally:
            watcher.cancel()
            run.cancel()
        choices = []
        for i, text in enumerate(t.whole() for t in run.texts):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": run.finish_reason(i)})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": run.finish_reason(i)})
        return {"id": rid, "object": kind, "created": created, "model": served.name, "choices": choices,
                "usage": usage()}

    @app.post("/v1/score")
    async def score(request: Request):
        body = await _body(request)
        served = _model(body, "score")
        pairs = body.get("pairs")
        if not isinstance(pairs, list) or not pairs:
            raise APIError(400, 'pairs: must be a non-empty list of {"prompt": ..., "response": ...}', "pairs")
        items = []
        for i, p in enumerate(pairs):
            where = f"pairs[{i}]"
            if not isinstance(p, dict) or not isinstance(p.get("response"), str):
                raise APIError(400, f'{where}: must be an object with "prompt" and a string "response"', where)
            prompt = p.get("prompt")
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            else:
                prompt = _messages({"messages": prompt}) if isinstance(prompt, list) else None
            if prompt is None:
                raise APIError(400, f"{where}.prompt: must be a string or a list of messages", f"{where}.prompt")
            items.append((prompt, p["response"]))
        scores, tokens = await asyncio.to_thread(_score, served, items)
        request.state.log = f"model={served.name} pairs={len(items)} tokens={tokens}"
        return {"object": "list", "model": served.name,
                "data": [{"object": "score", "index": i, "score": v} for i, v in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app


def _score(served: ServedModel, items: list[tuple[list[dict], str]], batch_size: int = 32) -> tuple[list[float], int]:
    """Reward of each (prompt messages, reply): the chat rendering of both, scored at its last token."""
    from prefcli.data.examples import encode_completion, pad_batch

    tok, model = served.loaded.tokenizer, served.loaded.model
    ctx = model.config.max_position_embeddings
    encoded = []
    for i, (prompt, reply) in enumerate(items):
        try:
            e = encode_completion(tok, prompt, [{"role": "assistant", "content": reply}], ctx)
        except PrefcliError as err:
            raise APIError(400, f"pairs[{i}]: {err.message}", f"pairs[{i}]") from None
        if e.truncated:
            raise APIError(400, f"pairs[{i}]: prompt and response are longer than the {ctx} tokens model "
                           f"{served.name!r} holds", f"pairs[{i}]", "context_length_exceeded")
        encoded.append(e)
    device = model.model.embed_tokens.weight.device
    scores: list[float] = []
    with served.lock, torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            b = pad_batch(encoded[i:i + batch_size], tok.pad_id)
            scores += model.sequence_scores(b["input_ids"].to(device), b["attention_mask"].to(device)).float().tolist()
    return scores, sum(len(e.ids) for e in encoded)
