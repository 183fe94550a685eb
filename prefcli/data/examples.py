"""Training examples from user rows: conversations, prompt/completion, preference pairs, prompts.

Rows are normalised to chat messages, rendered with the tokenizer's chat template
and turned into (ids, mask) where the mask marks the tokens the loss counts
(aligned with ids: mask[t] = 1 means token t is a target). Batching helpers pad
or pack them for the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefcli.chat_format import ROLES
from prefcli.errors import PrefcliError
from prefcli.tokenizer import Tokenizer


# ---------------------------------------------------------------- row formats
MAX_MARGIN = 1e4  # a pair's margin enters the loss beside log-ratios: larger ones only overflow it
def _check_messages(messages, where: str, field: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise PrefcliError(f"{where}: '{field}' must be a non-empty list of messages", 'each message is {"role": ..., "content": ...}')
    out = []
    for i, m in enumerate(messages):
        m = normalise_message(m, where, field, i)
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise PrefcliError(
                f"{where}: message {i} of '{field}' needs a role ({', '.join(ROLES)}) and a string content",
                'write messages as {"role": "user", "content": "..."}',
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


# ShareGPT's speakers, and OpenAI-style roles, as chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


def normalise_message(m, where: str, field: str, i: int):
    """A message as {"role", "content": str}: ShareGPT's {"from", "value"} and content given as
    a list of parts ([{"type": "text", "text": ...}], joined) are rewritten; anything else is
    returned as it is for the caller to check."""
    if not isinstance(m, dict):
        return m
    if "role" not in m and "from" in m:
        speaker = m["from"]
        if speaker not in SHAREGPT_ROLES:
            raise PrefcliError(f"{where}: message {i} of '{field}' is from '{speaker}'",
                               f"ShareGPT speakers must be one of {', '.join(sorted(SHAREGPT_ROLES))}")
        m = {"role": SHAREGPT_ROLES[speaker], "content": m.get("value")}
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise PrefcliError(f"{where}: message {i} of '{field}' has a '{kind}' content part",
                                   'only text parts ({"type": "text", "text": ...}) can be trained on')
        m = {**m, "content": "".join(texts)}
    return m


def _conversation_field(rec: dict) -> str | None:
    """Where a row keeps its conversation: "messages", or ShareGPT's "conversations"."""
    return next((k for k in ("messages", "conversations") if k in rec), None)


def _as_messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _check_messages(value, where, field)


def chat_from_row(rec: dict) -> list[dict]:
    """A conversation from {"messages": [...]} or {"prompt", "completion"} (strings or message lists)."""
    where = rec.get("_source", "row")
    conv = _conversation_field(rec)
    if conv:
        messages = _check_messages(rec[conv], where, conv)
    elif "prompt" in rec and "completion" in rec:
        messages = _as_messages(rec["prompt"], "user", where, "prompt") + _as_messages(rec["completion"], "assistant", where, "completion")
    else:
        raise PrefcliError(f"{where}: expected 'messages' (or ShareGPT 'conversations'), or 'prompt' and 'completion'",
                           "see the README for the data formats")
    if not any(m["role"] == "assistant" for m in messages):
        raise PrefcliError(f"{where}: the conversation has no assistant message", "add the reply the model should learn")
    return messages


@dataclass
class Pair:
    prompt: list[dict]      # messages up to the reply
    chosen: list[dict]      # the preferred reply (assistant messages)
    rejected: list[dict]
    margin: float = 0.0
    source: str = ""


def pair_from_row(rec: dict) -> Pair:
    """A preference pair from prompt/chosen/rejected as strings or message lists (TRL's formats).

    Without a prompt, chosen and rejected are whole conversations and the prompt is
    their common leading messages.
    """
    where = rec.get("_source", "row")
    if "chosen" not in rec or "rejected" not in rec:
        raise PrefcliError(f"{where}: a preference pair needs 'chosen' and 'rejected'", "see the README for the data formats")
    if "prompt" in rec:
        prompt = _as_messages(rec["prompt"], "user", where, "prompt")
        chosen = _as_messages(rec["chosen"], "assistant", where, "chosen")
        rejected = _as_messages(rec["rejected"], "assistant", where, "rejected")
    else:
        c = _check_messages(rec["chosen"], where, "chosen")
        r = _check_messages(rec["rejected"], where, "rejected")
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
        if not prompt:
            raise PrefcliError(f"{where}: chosen and rejected share no prompt", "add a 'prompt' field")
    margin = rec.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise PrefcliError(f"{where}: 'margin' must be a number", "or leave it out")
    if not -MAX_MARGIN <= margin <= MAX_MARGIN:  # also False for NaN
        raise PrefcliError(f"{where}: 'margin' is {margin}, not a finite number within ±{MAX_MARGIN:g}",
                           "a margin is a difference of scores; give a finite number, or leave it out")
    return Pair(prompt, chosen, rejected, float(margin), where)


def prompt_from_row(rec: dict) -> list[dict]:
    """The messages to reply to, from {"prompt": str | messages} or {"messages": [...]}."""
    where = rec.get("_source", "row")
    if "prompt" in rec:
        msgs = _as_messages(rec["prompt"], "user", where, "prompt")
    elif _conversation_field(rec):
        conv = _conversation_field(rec)
        msgs = _check_messages(rec[conv], where, conv)
        if msgs[-1]["role"] == "assistant":  # a conversation with its reply: drop the reply
            msgs = msgs[:-1]
    else:
        raise PrefcliError(f"{where}: expected 'prompt' or 'messages'", "each row is one prompt to reply to")
    return msgs


def prompt_text(messages: list[dict]) -> str:
    """The last user message: what a judge or reward function reads as 'the prompt'."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


# ---------------------------------------------------------------- encoding
@dataclass
class Encoded:
    ids: list[int]
    mask: list[int]          # 1 on target tokens (aligned with ids)
    prompt_len: int = 0      # tokens before the reply (completions only)
    truncated: bool = False


def encode_chat(tok: Tokenizer, messages: list[dict], max_len: int, train_on_prompt: bool = False) -> Encoded:
    """A conversation with the loss on assistant tokens (all tokens with train_on_prompt), cut to max_len."""
    ids, mask = tok.chat_ids_with_mask(messages)
    if train_on_prompt:
        mask = [0] + [1] * (len(ids) - 1)
    truncated = len(ids) > max_len
    return Encoded(ids[:max_len], mask[:max_len], 0, truncated)


def encode_completion(tok: Tokenizer, prompt: list[dict], reply: list[dict], max_len: int,
                      max_prompt_len: int | None = None) -> Encoded:
    """Prompt + reply with the loss on the reply's assistant tokens only.

    A prompt longer than max_prompt_len keeps its last max_prompt_len tokens (TRL's
    --max-prompt-length). Too long in all: the prompt loses its oldest tokens first
    (keeping at least half the budget for it when the reply is long), then the reply is
    cut at the end.
    """
    full, mask = tok.chat_ids_with_mask(prompt + reply)
    p_len = len(tok.chat_ids(prompt, add_generation_prompt=True))
    mask = [0] * p_len + mask[p_len:]
    cut = max(0, p_len - max_prompt_len) if max_prompt_len else 0
    if cut:
        full, mask, p_len = full[cut:], mask[cut:], p_len - cut
    if len(full) <= max_len:
        return Encoded(full, mask, p_len, cut > 0)
    reply_len = len(full) - p_len
    keep_prompt = max(min(p_len, max_len - reply_len), min(p_len, max_len // 2))
    start = p_len - keep_prompt
    ids, mask = full[start:][:max_len], mask[start:][:max_len]
    return Encoded(ids, mask, keep_prompt, True)


# ---------------------------------------------------------------- batching
def pad_batch(examples: list[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and loss_mask [B, T], padded to the longest example."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    loss = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = torch.tensor(e.ids)
        attn[i, sl] = 1
        loss[i, sl] = torch.tensor(e.mask)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def shares_prompt(a: Encoded, b: Encoded) -> bool:
    """Whether a and b start with the very same prompt tokens, none of them a target: then one row
    can hold the prompt once and both replies (pad_shared_prompt). Not so when truncation cut
    the two prompts differently, or a chat template tokenized the prompt/reply boundary apart."""
    p = a.prompt_len
    return 0 < p == b.prompt_len and a.ids[:p] == b.ids[:p] and not any(a.mask[:p]) and not any(b.mask[:p])


def pad_shared_prompt(pairs: list[tuple[Encoded, Encoded]], pad_id: int,
                      share: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """One right-padded row per pair: prompt + first reply + second reply (`model.shared_prompt_logprobs`).

    A pair that does not share its prompt (shares_prompt), or whose `share` flag is False,
    takes two rows, one sequence each.
    -> input_ids, loss_mask, attention_mask (1 on tokens) [R, T]; prompt_lengths, splits (where
    the second reply starts), lengths [R]; first, second [N]: where each pair's two sequences
    are in the flattened [R, 2] output of shared_prompt_logprobs (2 * row + part).
    """
    rows, first, second = [], [], []  # rows: (ids, mask, prompt length, split)
    for i, (a, b) in enumerate(pairs):
        if (share is None or share[i]) and shares_prompt(a, b):
            p = a.prompt_len
            first.append(2 * len(rows))
            second.append(2 * len(rows) + 1)
            rows.append((a.ids + b.ids[p:], a.mask + b.mask[p:], p, len(a.ids)))
        else:
            for e, where in ((a, first), (b, second)):
                where.append(2 * len(rows))
                rows.append((e.ids, e.mask, len(e.ids), len(e.ids)))
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    loss = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (row_ids, row_mask, _, _) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        attn[i, :len(row_ids)] = 1
        loss[i, :len(row_ids)] = torch.tensor(row_mask)
    return {"input_ids": ids, "loss_mask": loss, "attention_mask": attn,
            "prompt_lengths": torch.tensor([r[2] for r in rows]), "splits": torch.tensor([r[3] for r in rows]),
            "lengths": attn.sum(-1), "first": torch.tensor(first), "second": torch.tensor(second)}


def pack_rows(examples: list[Encoded], row_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack examples into rows of row_len tokens (first fit, in order) with document ids.

    Attention never crosses from one example to another (the model builds a
    block-diagonal causal mask from document_ids, and positions restart per
    example), so a packed row trains exactly like the examples one by one.
    The padding at a row's end is one more document that is never a target.
    An example's first token is never a target (its mask starts with <|bos|> = 0),
    so no loss reaches across from the example before it.
    """
    rows: list[list[Encoded]] = []
    space: list[int] = []
    for e in examples:
        for r, free in enumerate(space):
            if len(e.ids) <= free:
                rows[r].append(e)
                space[r] -= len(e.ids)
                break
        else:
            rows.append([e])
            space.append(row_len - len(e.ids))
    ids = torch.full((len(rows), row_len), pad_id, dtype=torch.long)
    docs = torch.zeros((len(rows), row_len), dtype=torch.long)
    loss = torch.zeros((len(rows), row_len), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for d, e in enumerate(row):
            n = len(e.ids)
            ids[r, pos : pos + n] = torch.tensor(e.ids)
            docs[r, pos : pos + n] = d
            loss[r, pos : pos + n] = torch.tensor(e.mask)
            pos += n
        docs[r, pos:] = len(row)  # the tail padding is one more document, never a target
    return {"input_ids": ids, "document_ids": docs, "loss_mask": loss}
