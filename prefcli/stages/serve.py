"""`prefcli serve`: answer OpenAI-style HTTP requests with workspace models.

Recipe: load each --model (a workspace name or an HF folder), decide what it is (a chat
model, a base model for plain completions, or a reward model), start a continuous-batching
engine for each generative one (prefcli.server.engine), and run the HTTP app
(prefcli.server.app) with uvicorn until Ctrl-C.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from prefcli.config import option
from prefcli.errors import PrefcliError
from prefcli.workspace import Workspace

MISSING_EXTRA = "prefcli serve needs the serve extra: pip install 'prefcli[serve]'"
API_KEY_ENV = "PREFCLI_API_KEY"


@dataclass
class ServeConfig:
    model: list[str] = option(factory=list, default_text="none",
                              help="A model to serve: a workspace name or a folder (prefcli or HF); repeat to serve several.")
    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 opens the server to the network (use --api-key then).")
    port: int = option(8000, "Port to listen on.", ge=1, le=65535)
    api_key: str | None = option(None, "Require 'Authorization: Bearer KEY' on every request.",
                                 default_text=f"${API_KEY_ENV}; unset: no key")
    max_batch: int = option(16, "Requests decoded together per model (continuous batching).", ge=1)
    max_queue: int = option(64, "Requests that may wait for a batch slot per model; more are answered 429.", ge=1)
    max_len: int | None = option(None, "Most tokens per request, prompt and reply.", ge=2,
                                 default_text="the model's context, at most 4096")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")


def served_name(ref: str) -> str:
    """The id clients use: the workspace name, or a folder's own name."""
    return Path(ref).name if ("/" in ref or os.sep in ref) else ref


def load_models(cfg: ServeConfig, ws: Workspace) -> dict:
    """{id: ServedModel} for every --model, each with its engine (generative) or scoring lock (reward)."""
    from prefcli.server.schemas import ServedModel
    from prefcli.server.engine import BatchEngine
    from prefcli.artifacts import load_model_artifact
    from prefcli.steer import load_steering
    from prefcli.trainer import resolve_device

    if not cfg.model:
        raise PrefcliError("serve needs at least one --model", "e.g. prefcli serve --model sft")
    if cfg.max_batch < 1 or cfg.max_queue < 1:
        raise PrefcliError(f"--max-batch {cfg.max_batch} / --max-queue {cfg.max_queue}: both must be at least 1")
    if cfg.max_len is not None and cfg.max_len < 2:
        raise PrefcliError(f"--max-len {cfg.max_len}: must be at least 2")
    device = resolve_device(cfg.device)
    models = {}
    for ref in cfg.model:
        name = served_name(ref)
        if name in models:
            raise PrefcliError(f"--model {ref}: a model named '{name}' is already served", "serve each model once")
        loaded = load_model_artifact(ws, ref, "--model", device=device)
        loaded.model.eval()
        if loaded.model.lm_head is None:
            models[name] = ServedModel(name, loaded, "reward")
            continue
        tok = loaded.tokenizer
        kind = "chat" if tok.has_chat_template and loaded.meta.get("chat") is not False else "base"
        steering = load_steering(loaded.path, loaded.model.config.hidden_size, device)
        max_len = min(cfg.max_len or 4096, loaded.model.config.max_position_embeddings)
        engine = BatchEngine(loaded.model, max_batch=cfg.max_batch, max_queue=cfg.max_queue, max_len=max_len, name=name)
        models[name] = ServedModel(name, loaded, kind, engine, steering)
    return models


def check_port(host: str, port: int) -> None:
    """A clear error now rather than a traceback from the server later."""
    if not 0 < port < 65536:
        raise PrefcliError(f"--port {port}: must be 1 to 65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise PrefcliError(f"--host {host} --port {port}: cannot listen there ({e.strerror})",
                           "pick another --port (something else uses this one?)") from None


def run(cfg: ServeConfig, ws: Workspace, as_json: bool = False) -> None:  # as_json: nothing to print (a log per request)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise PrefcliError(MISSING_EXTRA) from None
    from prefcli.server.app import create_app

    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV) or None
    check_port(cfg.host, cfg.port)
    models = load_models(cfg, ws)
    app = create_app(models, api_key)
    say = sys.stderr.write
    for name, m in models.items():
        extra = f", steerable: {', '.join(m.steering.attributes)}" if m.steering is not None else ""
        say(f"serving {name} ({m.kind}, context {m.context}{extra}) from {m.loaded.path}\n")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        say(f"warning: listening on {cfg.host} without --api-key: anyone who can reach it can use it\n")
    say(f"OpenAI base URL: http://{cfg.host}:{cfg.port}/v1{' (API key required)' if api_key else ''}; Ctrl-C stops\n")
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
    finally:
        for m in models.values():
            if m.engine is not None:
                m.engine.stop()
