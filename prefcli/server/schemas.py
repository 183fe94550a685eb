"""What `prefcli serve` answers for and what it accepts: the served models, OpenAI-shaped
errors, and the checks of a request body (by hand, not by pydantic, so every mistake comes
back in OpenAI's error shape naming its field: {"error": {"message", "type", "param", "code"}}).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from prefcli.chat_format import ROLES
from prefcli.errors import PrefcliError
from prefcli.server.engine import BatchEngine
from prefcli.artifacts import Loaded
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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)


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


def parse_messages(body: dict) -> list[dict]:
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


def parse_settings(body: dict, served: ServedModel) -> Settings:
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
