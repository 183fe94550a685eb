"""`prefcli chat`: talk to a model. A REPL on a terminal; one reply per line for scripts.

Recipe: pick the model (--model, else the newest chat model in the workspace), load it,
then for every user turn render the whole conversation with the chat template, feed the
KV cache only what it does not hold yet, and stream the sampled reply.

The conversation engine (KV cache across turns, old turns dropped to fit the context,
Ctrl-C keeping the partial reply, raw mode) is `prefcli.conversation`. --raw (or a model
with no chat template, or meta.json "chat": false) continues plain text. Piped lines are
independent prompts unless keep_context makes them one conversation.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.text import Text

from prefcli.artifacts import Loaded, load_model_artifact
from prefcli.chat_format import ROLES
from prefcli.conversation import SETTINGS, Conversation, Sampling, check_setting
from prefcli.errors import PrefcliError
from prefcli.config import option
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
    keep_context: bool = option(False, "Piped lines: keep one conversation (default: each line is an independent prompt).")


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


# ----------------------------------------------------------------------------- scripts

def piped(conv: Conversation, lines, keep_context: bool, as_json: bool) -> list[list[dict]] | None:
    """One reply per non-blank input line, one line each on stdout.

    Each line is an independent prompt, answered as `--prompt LINE` would be (a fresh
    conversation with the system prompt, the seed drawn from again); with keep_context
    the lines are the user turns of one conversation. Returns the conversations (None
    with keep_context: conv holds the one conversation).
    """
    conversations = None if keep_context else []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if not keep_context:
            conv.restart()
        r = conv.reply(line)
        if r.interrupted:
            raise KeyboardInterrupt
        if conversations is not None:
            conversations.append([dict(m) for m in conv.messages])
        if not as_json:
            # One line per reply, so output lines pair with input lines (--json keeps newlines).
            sys.stdout.write(_one_line(r.text) + "\n")
            sys.stdout.flush()
    return conversations


# ----------------------------------------------------------------------------- entry point

def run(cfg: ChatConfig, ws: Workspace, as_json: bool = False) -> dict:
    from prefcli.trainer import resolve_device

    sampling = Sampling()
    for name, flag in (("temperature", "--temperature"), ("top_p", "--top-p"), ("top_k", "--top-k"),
                       ("max_tokens", "--max-tokens")):
        setattr(sampling, name, check_setting(name, getattr(cfg, name), flag))
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

    conversations = None
    if cfg.prompt is not None:
        r = conv.reply(cfg.prompt)
        if r.interrupted:
            raise KeyboardInterrupt
        if not as_json:
            sys.stdout.write(r.text + "\n")
    elif not sys.stdin.isatty():
        conversations = piped(conv, sys.stdin, cfg.keep_context, as_json)
    else:
        repl(conv, ws, device)
    doc = conv.document()
    if conversations is not None:
        del doc["messages"]
        doc["conversations"] = conversations
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return doc
