"""The HTTP layer of `prefcli serve`: OpenAI's chat/completions API over BatchEngine.

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/score (reward
models), GET /v1/models, GET /health. Bodies are checked in schemas.py; a request runs as
a streams.Run and is answered as one JSON reply or as server-sent events ending in
`data: [DONE]`. A client that goes away cancels its jobs: they leave the batch before the
next decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefcli.errors import PrefcliError
from prefcli.server.schemas import APIError, ServedModel, Settings, parse_messages, parse_settings
from prefcli.server.streams import Run


async def _until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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
        s = parse_settings(body, served)
        messages = parse_messages(body)
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
        s = parse_settings(body, served)
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
                finished = False
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
                    finished = True
                except APIError as e:  # the headers are sent: the error goes in the stream
                    finished = True
                    request.state.log = f"model={served.name} error={e.code}"
                    yield f"data: {json.dumps(e.body())}\n\n"
                finally:
                    run.cancel()  # the client went away (or we are done): free the slots now
                    if not finished:
                        request.state.log = (f"model={served.name} client disconnected after "
                                             f"{run.completion_tokens} tokens")

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
                prompt = parse_messages({"messages": prompt}) if isinstance(prompt, list) else None
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
