"""A conversation with a model: messages, sampling settings and a KV cache kept across turns.

The cache is a `ChatSession` that lives across turns. Its tokens are always a prefix of
what the template renders for the conversation: a new turn keeps the longest common
prefix and prefills the rest (usually just the new turn). When the conversation would
overflow the model's context, the oldest turns are dropped (the system prompt stays),
so the common prefix shrinks and the cache is rebuilt from there.

Ctrl-C while a reply is generated stops it; the part already shown stays in the
history as the assistant's turn (a reply stopped before its first token takes its user
turn with it). Raw mode continues plain text instead: the conversation is one text,
each turn appended to it. `prefcli chat` is a terminal and script front end on this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from prefcli.artifacts import Loaded
from prefcli.errors import PrefcliError
from prefcli.generate import ChatSession
from prefcli.steer import CONFIG_FILE as STEER_CONFIG, load_steering
from prefcli.tokenizer import Tokenizer


# ----------------------------------------------------------------------------- settings

SETTINGS = ("temperature", "top_p", "top_k", "max_tokens")


def check_setting(name: str, value, where: str):
    """A sampling setting, converted and range-checked; `where` names it in errors (--top-p, /set top_p)."""
    try:
        v = float(value) if name in ("temperature", "top_p") else int(str(value))
    except ValueError:
        kind = "a number" if name in ("temperature", "top_p") else "a whole number"
        raise PrefcliError(f"{where}: '{value}' is not {kind}") from None
    bad = {
        "temperature": not (v >= 0 and v != float("inf")) and "must be 0 (greedy) or more",
        "top_p": not 0 < v <= 1 and "must be in (0, 1]",
        "top_k": v < 0 and "must be 0 (off) or more",
        "max_tokens": v < 1 and "must be at least 1",
    }[name]
    if bad:
        raise PrefcliError(f"{where}: {value} {bad}")
    return v


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    max_tokens: int = 256

    def set(self, name: str, value: str, where: str = "/set") -> None:
        name = name.replace("-", "_")
        if name not in SETTINGS:
            raise PrefcliError(f"/set: unknown setting '{name}'", f"settings: {', '.join(SETTINGS)}")
        setattr(self, name, check_setting(name, value, f"{where} {name}"))


# ----------------------------------------------------------------------------- streaming text

class StreamDecoder:
    """Token ids in, new text out, never splitting a multi-byte character.

    Decodes a short window (the tokens already shown before the new ones, for decoders
    whose output depends on context, such as a dropped leading space) and returns only
    what is new. Text ending in U+FFFD is an incomplete UTF-8 sequence: it waits for
    the next token.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[:read] are shown

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is held back (the reply ended inside a character)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


# ----------------------------------------------------------------------------- the conversation

@dataclass
class Reply:
    text: str
    tokens: list[int] = field(default_factory=list)  # sampled ids, the stop token included if hit
    seconds: float = 0.0
    interrupted: bool = False
    dropped: int = 0  # old turns dropped to fit the context
    prefilled: int = 0  # tokens prefilled this turn (the rest of the prompt came from the cache)

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def raw_join(parts: list[str]) -> str:
    """Raw mode's text: the turns one after another, a space between where neither side has one."""
    text = ""
    for p in parts:
        if text and p and not text[-1].isspace() and not p[0].isspace():
            text += " "
        text += p
    return text


class Conversation:
    """Messages (an optional system prompt first, then user/assistant turns) and the KV cache."""

    def __init__(self, loaded: Loaded, name: str, *, raw: bool = False, sampling: Sampling | None = None,
                 seed: int | None = None, max_len: int | None = None, force_raw: bool = False):
        self.sampling = sampling or Sampling()
        self.force_raw = force_raw  # --raw: every model this conversation switches to is raw too
        self.messages: list[dict] = []
        self.seed = seed
        self.max_len_override = max_len
        self.use(loaded, name, raw)

    def use(self, loaded: Loaded, name: str, raw: bool) -> None:
        """Switch to another model; the messages stay (a steered model starts at its defaults)."""
        self.loaded, self.name, self.raw = loaded, name, raw
        self.tok = loaded.tokenizer
        self.session = ChatSession(loaded.model, self.max_len_override)
        self.stop_ids = self.tok.stop_ids(chat=not raw)
        device = loaded.model.model.embed_tokens.weight.device
        self.generator = None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)
        self.steering = load_steering(loaded.path, loaded.model.config.hidden_size, device)  # None: not steerable
        self.prefs: dict[str, float] = {}

    @property
    def max_len(self) -> int:
        return self.session.max_len

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str | None) -> None:
        """Set (or with None/"" remove) the system prompt; the turns stay."""
        turns = self.messages[1:] if self.system is not None else self.messages
        new = ([{"role": "system", "content": text}] if text else []) + turns
        if text and not self.raw:
            self.tok.render(new[:1])  # a template without system messages says so now, not at the next turn
        self.messages = new

    def reset(self) -> None:
        """Forget the turns (the system prompt stays)."""
        self.messages = self.messages[:1] if self.system is not None else []
        self.session.reset()

    def restart(self) -> None:
        """A new conversation as if just started: the turns forgotten, the seed drawn from again."""
        self.reset()
        if self.seed is not None:
            self.generator.manual_seed(self.seed)

    def load(self, messages: list[dict]) -> None:
        self.messages = [dict(m) for m in messages]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """What the model sees before its reply: the template's rendering, or raw mode's text."""
        if not self.raw:
            return self.tok.chat_ids(messages, add_generation_prompt=True)
        start = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
        return ([start] if start is not None else []) + self.tok.encode(raw_join([m["content"] for m in messages]))

    def _fit(self) -> tuple[list[int], list[dict], int]:
        """The prompt ids, the messages kept and how many turns were dropped to leave room for a reply.

        Room kept for the reply: max_tokens, at most half the context. The system prompt and
        the newest user turn are never dropped; if they alone do not fit, it is an error (and
        nothing is dropped).
        """
        reserve = min(self.sampling.max_tokens, self.max_len // 2)
        messages = list(self.messages)
        first = 1 if self.system is not None else 0
        dropped = 0
        while True:
            ids = self.prompt_ids(messages)
            if len(ids) + reserve <= self.max_len:
                return ids, messages, dropped
            if len(messages) - first <= 1:
                if len(ids) < self.max_len:
                    return ids, messages, dropped  # the reply gets what room is left
                raise PrefcliError(
                    f"the message is {len(ids)} tokens with the system prompt; {self.name} holds {self.max_len}",
                    "send a shorter message (or set a shorter /system prompt)",
                )
            del messages[first]  # the oldest turn: a user message and the replies after it
            while len(messages) - first > 1 and messages[first]["role"] == "assistant":
                del messages[first]
            dropped += 1

    def _sync(self, ids: list[int]) -> int:
        """Make the cache hold `ids`: keep the common prefix, prefill the rest. Returns tokens prefilled."""
        s = self.session
        keep = 0
        for a, b in zip(s.tokens, ids):
            if a != b:
                break
            keep += 1
        if keep < s.length:
            s.truncate(keep)
        cached = s.cache.length
        s.append(ids[keep:])
        return len(ids) - cached

    def reply(self, text: str, on_text=None) -> Reply:
        """Add a user turn, sample the reply (streamed to on_text(piece)), add it to the history.

        Ctrl-C is caught: the reply so far is kept (Reply.interrupted); the caller decides
        whether to go on.
        """
        self.messages.append({"role": "user", "content": text})
        decoder = StreamDecoder(self.tok)
        tokens: list[int] = []

        def on_token(token: int) -> None:
            tokens.append(token)
            if on_text is not None:
                piece = decoder.push(token)
                if piece:
                    on_text(piece)

        s = self.sampling
        result = Reply("", tokens)
        t0 = time.perf_counter()
        try:
            ids, self.messages, result.dropped = self._fit()
            result.prefilled = self._sync(ids)
            self.session.sample(s.max_tokens, s.temperature, s.top_k, s.top_p, stop_ids=self.stop_ids,
                                on_token=on_token, seed=self.generator)
        except KeyboardInterrupt:
            result.interrupted = True
            # The cache may hold part of a step; crop it back to what the session knows is fed.
            self.session.truncate(self.session.length)
        except BaseException:
            self.messages.pop()  # an error (a message too long for the context): the turn is not taken
            raise
        result.seconds = time.perf_counter() - t0
        if on_text is not None:
            rest = decoder.flush()
            if rest:
                on_text(rest)
        content = tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens
        result.text = self.tok.decode(content)
        if result.interrupted and not tokens:
            self.messages.pop()  # nothing was said: as if the turn was never sent
        else:
            self.messages.append({"role": "assistant", "content": result.text})
        return result

    def steered(self, where: str):
        """The model's steering (prefcli.steer.Steering); an error for a model without."""
        if self.steering is None:
            raise PrefcliError(f"{where}: {self.name} has no steering weights ({STEER_CONFIG})",
                               "steer a model made by `prefcli align --method steer`")
        return self.steering

    def prefer(self, spec: str | None, where: str = "/prefer") -> None:
        """Steer: set the attributes named in spec (NAME=WEIGHT,...; the others keep theirs), or with
        None go back to the defaults. The conversation stays; the next turn prefills it again."""
        steering = self.steered(where)
        self.prefs = {**self.prefs, **steering.parse(spec, where)} if spec is not None else {}
        self.session.set_embed_offset(steering.offset(self.prefs))

    def document(self) -> dict:
        doc = {"model": self.name, "path": str(self.loaded.path), "raw": self.raw, "messages": self.messages}
        if self.steering is not None:
            doc["prefer"] = dict(zip(self.steering.attributes, self.steering.vector(self.prefs).tolist()))
        return doc
