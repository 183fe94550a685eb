"""BPE tokenizers: training (HF tokenizers), saving as an HF folder, loading, chat rendering.

A prefcli tokenizer folder holds tokenizer.json and tokenizer_config.json (special
tokens and the Jinja chat template), so `transformers.AutoTokenizer` loads it and
its `apply_chat_template` gives the same ids as `Tokenizer.chat_ids`. Folders made
by transformers (Llama, Qwen2, SmolLM, ...) load too, with their own template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from prefcli.chat_format import BOS, CHAT_TEMPLATE, END, EOS, PAD, SPECIAL_TOKENS, render_chat
from prefcli.errors import PrefcliError

# chat_template.jinja: where transformers 5 writes the template (tokenizer_config.json no longer holds it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_BYTE_ALPHABET = 256


def min_vocab_size() -> int:
    return _BYTE_ALPHABET + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None) -> _HFTokenizer:
    """Train a byte-level BPE on a stream of documents (bounded memory: tokenizers counts words)."""
    if vocab_size < min_vocab_size():
        raise PrefcliError(
            f"--vocab-size {vocab_size} is too small for the 256 byte symbols and {len(SPECIAL_TOKENS)} special tokens",
            f"use at least {min_vocab_size()} (2048 suits the demo data)",
        )
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def save_tokenizer(tok: _HFTokenizer, folder: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (chat template) + special_tokens_map.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy a tokenizer's files into a model folder (a model folder carries its tokenizer)."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def encoding_identity(tokenizer_json: str) -> str:
    """sha256 of what decides the ids and the text: model (vocabulary, merges), added and special
    tokens, normaliser, pre-tokeniser, decoder, and the post-processor unless it adds no token.

    Not the file's bytes: transformers 5 rewrites tokenizer.json on save_pretrained with a
    post-processor that only passes the sequence through (and may drop or add padding and
    truncation settings), which changes no id.
    """
    import hashlib

    doc = json.loads(tokenizer_json)
    post = doc.get("post_processor")
    if _adds_no_tokens(post):
        post = None
    added = sorted((t.get("id"), t.get("content"), bool(t.get("special"))) for t in doc.get("added_tokens") or [])
    keep = {"model": doc.get("model"), "added_tokens": added, "normalizer": doc.get("normalizer"),
            "pre_tokenizer": doc.get("pre_tokenizer"), "decoder": doc.get("decoder"), "post_processor": post}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _adds_no_tokens(post) -> bool:
    """A post-processor that changes no ids: none, ByteLevel (offsets only), or a template of bare sequences."""
    if post is None or post.get("type") == "ByteLevel":
        return True
    if post.get("type") == "TemplateProcessing":
        return all("Sequence" in piece for piece in post.get("single", []) + post.get("pair", []))
    if post.get("type") == "Sequence":
        return all(_adds_no_tokens(p) for p in post.get("processors", []))
    return False


def same_tokenizer(a: "Tokenizer", b: "Tokenizer") -> bool:
    """The same ids for the same text (see encoding_identity)."""
    return a.identity == b.identity


class Tokenizer:
    """A loaded tokenizer: encode/decode, special ids, and chat rendering with assistant masks."""

    def __init__(self, folder: Path | str):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise PrefcliError(f"{folder}: no tokenizer.json", "pass a prefcli tokenizer or model folder, or an HF model folder")
        try:
            self.hf = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise PrefcliError(f"{path}: cannot be read as a tokenizer ({e})", "rebuild it with `prefcli tokenize --overwrite`")
        self.folder = folder
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template: str | None = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # HF allows named templates
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()))
        if (folder / "chat_template.jinja").is_file():  # transformers 5's place for it, and its first choice
            self.chat_template = (folder / "chat_template.jinja").read_text()
        self._own_format = self.chat_template == CHAT_TEMPLATE
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self._jinja = None
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = encoding_identity(self.hf.to_str())
        return self._identity

    # ---- ids ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        for t in (self.pad_token, self.eos_token):
            i = self.token_id(t)
            if i is not None:
                return i
        return 0

    @property
    def end_id(self) -> int | None:
        """The token that ends a chat turn (<|end|> for prefcli; the template's own otherwise)."""
        if self._own_format:
            return self.token_id(END)
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
            i = self.token_id(t)
            if i is not None:
                return i
        return self.eos_id

    def stop_ids(self, chat: bool = True) -> list[int]:
        ids = [self.end_id] if chat else []
        ids.append(self.eos_id)
        return sorted({i for i in ids if i is not None})

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat --------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text for `messages` (what transformers' apply_chat_template renders)."""
        if self._own_format:
            return render_chat(messages, add_generation_prompt)
        if not self.chat_template:
            raise PrefcliError(
                f"{self.folder}: the tokenizer has no chat template",
                "use --raw for plain continuation, or a tokenizer made by `prefcli tokenize`",
            )
        if self._jinja is None:
            self._jinja = _compile_template(self.chat_template)
        return self._jinja.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt))

    def chat_ids_with_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Ids of the whole conversation and a 0/1 mask that is 1 on assistant tokens.

        An assistant turn is the text the template adds for that message after the
        generation prompt (its content and end-of-turn token), found by rendering
        prefixes of the conversation; a token is masked in when it starts there.
        """
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            after = self.render(messages[: i + 1])
            if not text.startswith(after) or not after.startswith(before):
                raise PrefcliError(
                    f"{self.folder}: the chat template does not render conversations incrementally",
                    "use a tokenizer whose template renders each message after the previous ones",
                )
            spans.append((len(before), len(after)))
        enc = self.hf.encode(text, add_special_tokens=False)
        mask = [0] * len(enc.ids)
        for t, (start, end) in enumerate(enc.offsets):
            if any(s <= start < e for s, e in spans) and end > start:
                mask[t] = 1
        return enc.ids, mask


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older configs
        return value.get("content")
    return value


def _compile_template(source: str):
    """Compile an HF chat template with a sandboxed Jinja environment (as transformers does)."""
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # {% generation %}...{% endgeneration %} only marks assistant text for masks.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise PrefcliError(f"chat template: {message}", "check the messages' roles and order")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def iter_text_chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Group a stream of documents into lists of `size` for batched encoding."""
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
