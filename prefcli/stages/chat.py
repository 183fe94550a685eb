"""`prefcli chat`: talk to a model. A REPL on a terminal; one reply per line for scripts.

Recipe: pick the model (--model, else the newest chat model in the workspace), load it,
then for every user turn render the whole conversation with the chat template, feed the
KV cache only what it does not hold yet, and stream the sampled reply.

The cache is a `ChatSession` that lives across turns. Its tokens are always a prefix of
what the template renders for the conversation: a new turn keeps the longest common
prefix and prefills the rest (usually just the new turn). When the conversation would
overflow the model's context, the oldest turns are dropped (the system prompt stays),
so the common prefix shrinks and the cache is rebuilt from there.

Ctrl-C while a reply is generated stops it; the part already shown stays in the
history as the assistant's turn (a reply stopped before its first token takes its user
turn with it). --raw (or a model with no chat template, or meta.json "chat": false)
continues plain text instead: the conversation is one text, each turn appended to it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text

from prefcli.chat_format import ROLES
from prefcli.errors import PrefcliError
from prefcli.config import option
from prefcli.generate import ChatSession
from prefcli.stages.common import Loaded, load_model_artifact
from prefcli.steer import CONFIG_FILE as STEER_CONFIG, load_steering
from prefcli.tokenizer import Tokenizer
from prefcli.workspace import Workspace, read_meta

err = Console(stderr=True, highlight=False)  # decoration: labels, notes, errors (the reply goes to stdout)


@dataclass
class ChatConfig:
    model: str | None = option(None, "Model to chat with: a workspace name or a folder (prefcli or HF).",  # None: the newest chat model in the workspace
                               default_text="the newest chat model (an aligned policy, else sft)")
    raw: bool = option(False, "Plain text continuation without the chat template (base models).")
    prompt: str | None = option(None, "Print the reply to this one message on stdout and exit.", default_text="none")
    system: str | None = option(None, "System prompt.", default_text="none")
    prefer: str | None = option(None, "Steer a model made by `align --method steer`: NAME=WEIGHT,... (e.g. correct=1,polite=0); "
                                      "unnamed attributes keep their defaults (1).", default_text="none")
    # The sampling settings' ranges are checked by check_setting, in the same words as the REPL's /set.
    temperature: float = option(0.7, "Sampling temperature; 0 is greedy and repeatable.")
    top_p: float = option(0.9, "Nucleus sampling: keep the most likely tokens up to this mass.")
    top_k: int = option(0, "Keep only the k most likely tokens; 0 is off.")
    max_tokens: int = option(256, "Longest reply in tokens.")
    seed: int | None = option(None, "Random seed.", default_text="random")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")


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


# ----------------------------------------------------------------------------- model choice

def _is_sft(meta: dict) -> bool:
    return meta.get("stage") in ("sft", "align sft") or (meta.get("config") or {}).get("method") == "sft"


def default_model(ws: Workspace) -> tuple[str, str]:
    """The newest chat model: an aligned policy if there is one, else an SFT model. (name, why)."""
    best = None
    for row in ws.artifacts():
        if row["kind"] != "models" or row["damaged"]:
            continue
        try:
            meta = read_meta(Path(row["path"]))
        except PrefcliError:
            continue
        if meta.get("chat") is not True or meta.get("kind", "model") != "model":
            continue
        key = (not _is_sft(meta), meta.get("created") or "", row["name"])
        best = max(best, key) if best else key
    if best is None:
        raise PrefcliError(
            f"no chat model in workspace {ws.root}",
            "train one with `prefcli align --method sft`, or pass --model NAME|PATH (--raw for a base model)",
        )
    return best[2], "the newest aligned policy" if best[0] else "the newest SFT model"


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


# ----------------------------------------------------------------------------- loading

def load(ws: Workspace, ref: str, device, force_raw: bool, option: str = "--model") -> tuple[Loaded, bool, str | None]:
    """The model, whether to chat raw, and a note when raw was chosen for the user."""
    loaded = load_model_artifact(ws, ref, option, kind="causal_lm", device=device)
    loaded.model.eval()
    if force_raw:
        return loaded, True, None
    if not loaded.tokenizer.has_chat_template:
        why = "its tokenizer has no chat template"
    elif loaded.meta.get("chat") is False:
        why = f"made by {loaded.meta.get('stage') or 'another stage'}; its meta.json says chat: false"
    else:
        return loaded, False, None
    return loaded, True, f"{ref} is not a chat model ({why}): continuing plain text, as with --raw"


def read_messages(path: str) -> list[dict]:
    """A conversation file: a JSON list of {"role", "content"} (or {"messages": [...]}), checked."""
    p = Path(path).expanduser()
    where = f"/load {path}"
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise PrefcliError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PrefcliError(f"{where}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise PrefcliError(f"{where}: not valid JSON (line {e.lineno}: {e.msg})", "save one with /save FILE") from None
    if isinstance(doc, dict) and "messages" in doc:
        doc = doc["messages"]
    if not isinstance(doc, list):
        raise PrefcliError(f"{where}: expected a list of messages", 'the file holds [{"role": "user", "content": "..."}, ...]')
    for i, m in enumerate(doc, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PrefcliError(f"{where}: message {i} is not an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise PrefcliError(f"{where}: message {i} has role '{m['role']}'", "roles are system, user and assistant")
        if m["role"] == "system" and i != 1:
            raise PrefcliError(f"{where}: message {i} is a system message", "only the first message may be one")
    return [{"role": m["role"], "content": m["content"]} for m in doc]


# ----------------------------------------------------------------------------- the REPL

HELP = """\
/help                 this list
/reset                forget the conversation (the system prompt stays)
/system TEXT          set the system prompt (no TEXT: remove it)
/set NAME VALUE       temperature, top_p, top_k or max_tokens (no NAME: show them)
/save FILE            write the conversation as JSON messages
/load FILE            read a conversation written by /save (or --json)
/model NAME|PATH      switch models; the conversation stays
/prefer NAME=W,...    steer a model made by align --method steer (no args: show; 'default': reset)
/quit                 leave (so does Ctrl-D)
Ctrl-C stops a reply (what was shown stays in the history); //text sends a line starting with '/'."""


# Control characters a model might emit (escape sequences, carriage returns) are shown as U+FFFD:
# the reply must not drive the terminal. The history keeps the text as it was.
_CONTROL = {c: "\ufffd" for c in [*range(0, 9), *range(11, 32), 127]}


def _one_line(text: str) -> str:
    """The reply's lines (as str.splitlines cuts them) joined by spaces: one reply, one line."""
    return " ".join(text.splitlines())


def _color_ok() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _user_prompt() -> str:
    # \001 \002 tell readline the escape codes take no room on the line.
    return "\001\033[1;32m\002you>\001\033[0m\002 " if _color_ok() else "you> "


def _read_line(prompt: str) -> str:
    if sys.stdout.isatty():
        return input(prompt)  # readline: line editing and history
    err.print(prompt, end="")  # stdout is a file: keep the prompt out of it
    return input()


def _error(e: PrefcliError) -> None:
    line = Text("error: ", style="bold red")
    line.append(e.message + (f" (hint: {e.hint})" if e.hint else ""))
    err.print(line, soft_wrap=True)


def _note(text: str) -> None:
    err.print(Text(text, style="dim"), soft_wrap=True)


def _say(conv: Conversation, text: str) -> None:
    """One exchange on the terminal: the reply streamed to stdout, then its speed."""
    err.print(Text(f"{conv.name}>", style="bold cyan"), end=" ")

    color, plain = ("\033[36m", "\033[0m") if _color_ok() else ("", "")
    sys.stdout.write(color)

    def show(piece: str) -> None:
        # Plain writes (no rich) so a Ctrl-C between two tokens cannot leave a console half-way.
        sys.stdout.write(piece.translate(_CONTROL))
        sys.stdout.flush()

    try:
        r = conv.reply(text, show)
    finally:
        sys.stdout.write(plain + "\n")
        sys.stdout.flush()
    stats = f"[{len(r.tokens)} token{'s' * (len(r.tokens) != 1)}, {r.tokens_per_s:.0f} tokens/s"
    if r.dropped:
        stats += f"; dropped the {r.dropped} oldest turn{'s' * (r.dropped > 1)} to fit the context of {conv.max_len}"
    if r.interrupted:
        stats += "; stopped: the partial reply stays in the history" if r.tokens else "; stopped before the first token"
    _note(stats + "]")


def _command(conv: Conversation, line: str, ws: Workspace, device) -> bool:
    """Run a /command; True means leave."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return True
    if name == "help":
        err.print(HELP, markup=False)
    elif name == "reset":
        conv.reset()
        _note("conversation cleared" + (" (the system prompt stays)" if conv.system else ""))
    elif name == "system":
        conv.set_system(arg or None)
        _note(f"system prompt set ({len(arg)} characters)" if arg else "system prompt removed")
    elif name == "set":
        if not arg:
            _note(", ".join(f"{k}={getattr(conv.sampling, k)}" for k in SETTINGS))
            return False
        key, _, value = arg.partition(" ")
        if not value.strip():
            raise PrefcliError(f"/set {key}: needs a value", "e.g. /set temperature 0.5")
        conv.sampling.set(key, value.strip())
        _note(f"{key.replace('-', '_')} = {getattr(conv.sampling, key.replace('-', '_'))}")
    elif name == "save":
        if not arg:
            raise PrefcliError("/save: needs a file name", "e.g. /save chat.json")
        try:
            Path(arg).expanduser().write_text(json.dumps(conv.messages, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise PrefcliError(f"/save {arg}: cannot be written ({e.strerror})") from None
        _note(f"saved {len(conv.messages)} messages to {arg}")
    elif name == "load":
        if not arg:
            raise PrefcliError("/load: needs a file name", "e.g. /load chat.json")
        conv.load(read_messages(arg))
        _note(f"loaded {len(conv.messages)} messages from {arg}")
    elif name == "prefer":
        if arg:
            conv.prefer(None if arg == "default" else arg)
        _note(f"preferences: {conv.steered('/prefer').describe(conv.prefs)}")
    elif name == "model":
        if not arg:
            _note(f"model: {conv.name} ({conv.loaded.path}{', raw' if conv.raw else ''})")
            return False
        loaded, raw, note = load(ws, arg, device, force_raw=conv.force_raw, option="/model")
        conv.use(loaded, arg, raw)
        if note:
            _note(note)
        _note(f"now chatting with {arg}, context {conv.max_len} tokens")
    else:
        raise PrefcliError(f"unknown command /{name}", "/help lists the commands; //text sends a line starting with '/'")
    return False


def repl(conv: Conversation, ws: Workspace, device) -> None:
    try:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    except ImportError:  # pragma: no cover - Windows without pyreadline
        pass
    mode = "plain text continuation" if conv.raw else "chat template"
    _note(f"chatting with {conv.name} ({mode}, context {conv.max_len} tokens). /help for commands, Ctrl-D to leave.")
    while True:
        try:
            line = _read_line(_user_prompt())
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print()
            continue
        if not line.strip():
            continue
        try:
            if line.startswith("/") and not line.startswith("//"):
                if _command(conv, line.strip(), ws, device):
                    return
            else:
                _say(conv, line[1:] if line.startswith("//") else line)
        except PrefcliError as e:
            _error(e)
        except KeyboardInterrupt:  # outside a reply (loading a model, say): back to the prompt
            err.print()
            _note("interrupted")


# ----------------------------------------------------------------------------- entry point

def run(cfg: ChatConfig, ws: Workspace, as_json: bool = False) -> dict:
    from prefcli.trainer import resolve_device

    sampling = Sampling()
    for name, option in (("temperature", "--temperature"), ("top_p", "--top-p"), ("top_k", "--top-k"),
                         ("max_tokens", "--max-tokens")):
        setattr(sampling, name, check_setting(name, getattr(cfg, name), option))
    device = resolve_device(cfg.device)
    ref = cfg.model
    if ref is None:
        ref, why = default_model(ws)
        _note(f"model: {ref} ({why} in {ws.root}; --model picks another)")
    loaded, raw, note = load(ws, ref, device, cfg.raw)
    if note:
        _note(note)
    conv = Conversation(loaded, ref, raw=raw, sampling=sampling, seed=cfg.seed, force_raw=cfg.raw)
    if cfg.prefer is not None:
        conv.prefer(cfg.prefer, "--prefer")
    if cfg.system:
        conv.set_system(cfg.system)

    if cfg.prompt is not None:
        r = conv.reply(cfg.prompt)
        if r.interrupted:
            raise KeyboardInterrupt
        if not as_json:
            sys.stdout.write(r.text + "\n")
    elif not sys.stdin.isatty():
        for line in sys.stdin:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            r = conv.reply(line)
            if r.interrupted:
                raise KeyboardInterrupt
            if not as_json:
                # One line per reply, so output lines pair with input lines (--json keeps newlines).
                sys.stdout.write(_one_line(r.text) + "\n")
                sys.stdout.flush()
    else:
        repl(conv, ws, device)
    doc = conv.document()
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return doc
