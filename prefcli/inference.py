"""Model x data operations every stage shares, each written once.

- log-probs: of a frozen model over many sequences, in length-sorted batches
  (`token_logps`, `sequence_logps`, `teacher_forced_logprobs`); of the reply columns of
  one padded batch (`reply_token_logps`, the RL hot path); of two replies to one prompt,
  the prompt run once when that is faster (`pair_logprobs`, `pair_sequence_logps`);
- reward scores of prompt/reply pairs, pooled by `Transformer.sequence_scores`
  (`encoded_scores`, `reward_scores`, `RewardScorer`; `SequenceScores` for training);
- N sampled replies per prompt with the KV-cache engine (`sample_ids`, `sample_replies`);
- length groups for training batches (`in_length_groups`).

Used by the training stages, `eval`, online RL and (later) `serve`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from prefcli import distributed as dist
from prefcli.data.examples import Encoded, encode_completion, pad_batch, pad_shared_prompt, shares_prompt
from prefcli.generate import generate
from prefcli.model import Transformer, _bare, chunked_reply_logprobs, chunked_sequence_logprobs, shared_prompt_logprobs
from prefcli.objectives.lm import selective_logprobs
from prefcli.progress import progress
from prefcli.tokenizer import Tokenizer

LOGIT_BUDGET = 1 << 25  # float32 logits held at once by a teacher-forced pass (~128 MB)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- length groups (training)
def length_groups() -> int:
    """How many length groups a training batch runs in: 3 in one process, 1 under DDP/FSDP
    (their hooks expect one forward per backward)."""
    return 3 if dist.world_size() == 1 else 1


def in_length_groups(fn, attention_mask: torch.Tensor, groups: int):
    """Run fn(rows, width) over right-padded rows in `groups` passes sorted by length.

    Each pass sees only its rows, cut to its own longest row: in a batch of chosen and rejected
    replies over half the tokens are padding (one rambling reply sets every row's width). fn
    returns a tensor or a tuple of tensors with one entry per row; they come back in the
    original row order, equal to one pass over the whole batch.
    """
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths) if groups > 1 else torch.arange(len(lengths), device=lengths.device)
    parts = [fn(rows, int(lengths[rows].max())) for rows in order.chunk(groups)]
    undo = torch.argsort(order)
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p)[undo] for p in zip(*parts))
    return torch.cat(parts)[undo]


def _sorted_batches(lengths: list[int], batch_size: int, row_width: int = 1):
    """Index lists of rows in length order, batch_size at a time (fewer when
    rows x longest length x row_width would pass LOGIT_BUDGET)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    i = 0
    while i < len(order):
        longest = lengths[order[min(i + batch_size, len(order)) - 1]]
        n = max(1, min(batch_size, LOGIT_BUDGET // max(1, longest * row_width)))
        yield order[i:i + n]
        i += n


def _right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------- log-probs
def reply_logits(model: Transformer, input_ids, attention_mask, start: int) -> torch.Tensor:
    """Logits that predict the tokens of columns start..end: the head runs on those only."""
    hidden = model(input_ids, attention_mask=attention_mask, return_hidden=True)[:, start - 1:-1]
    return model.lm_head(hidden)


@torch.no_grad()
def reply_token_logps(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                      mask: torch.Tensor) -> torch.Tensor:
    """A frozen model's log-probs of the tokens from column `start` of one padded batch [B, T - start],
    0 where `mask` is 0 (online RL's reference pass over its rollouts); chunked, no full logits."""
    return chunked_reply_logprobs(model, input_ids, attention_mask, start) * mask


@torch.no_grad()
def token_logps(model: Transformer, sequences: list[list[int]], batch_size: int = 64,
                desc: str | None = None) -> list[torch.Tensor]:
    """log p(seq[t] | seq[:t]) for t >= 1 of each sequence ([len - 1] float32 on the CPU), no gradients.

    Sequences run right-padded in batches of similar length, so little is spent on padding; the
    head runs in chunks on the hidden states (no full-vocabulary logits). desc: show progress
    with an ETA under that name.
    """
    out: list[torch.Tensor] = [torch.zeros(0)] * len(sequences)
    if not sequences:
        return out
    device = device_of(model)
    bar = progress(len(sequences), desc, unit="seq") if desc else None
    for chunk in _sorted_batches([len(s) for s in sequences], batch_size):
        ids, mask = _right_padded([sequences[j] for j in chunk], 0)
        ids = ids.to(device)
        hidden = model(ids, attention_mask=None if bool(mask.all()) else mask.to(device), return_hidden=True)
        # logp[:, t - 1] is for token t
        logp = selective_logprobs(hidden[:, :-1], model.lm_head.weight, ids[:, 1:]).float().cpu()
        for r, j in enumerate(chunk):
            out[j] = logp[r, :len(sequences[j]) - 1]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def teacher_forced_logprobs(model: Transformer, sequences: list[list[int]], starts: list[int],
                            batch_size: int = 64) -> list[list[float]]:
    """log p(seq[t] | seq[:t]) under `model` for t >= start, each sequence fed whole."""
    return [lp[s - 1:].tolist() for lp, s in zip(token_logps(model, sequences, batch_size), starts)]


def sequence_logps(model: Transformer, encs: list[Encoded], pad_id: int, batch_size: int, device=None,
                   desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's target tokens (its loss mask), and the token counts; no gradients.

    pad_id and device are accepted for the callers' convenience: padding never counts, and
    the inputs go where the model is. desc: show progress with an ETA under that name.
    """
    model.eval()
    per_token = token_logps(model, [e.ids for e in encs], batch_size, desc)
    masks = [torch.tensor(e.mask[1:], dtype=torch.float32) for e in encs]
    logps = torch.stack([(lp * m).sum() for lp, m in zip(per_token, masks)]) if encs else torch.zeros(0)
    counts = torch.tensor([int(m.sum()) for m in masks], dtype=torch.long)
    return logps, counts


# ---------------------------------------------------------------- log-probs of pairs (one prompt, two replies)
def worth_sharing(pairs: list[tuple[Encoded, Encoded]], config) -> list[bool]:
    """Per pair: whether one row (prompt once, then both replies: `shared_prompt_logprobs`) costs
    less than two rows on a model of this shape (a ModelConfig).

    One layer's work in multiply-adds: each token costs `per_token` in the projections and the
    MLP, each query-key pair `per_key` in attention (masked keys are computed too). One row
    saves the prompt's second copy, P tokens, but its attention spans the longer row:
    (P+C+R)^2 - (P+C)^2 - (P+R)^2 = 2CR - P^2 more query-key pairs. Short prompts before long
    replies lose. Padding, the fewer rows and the head (the same targets either way) are left out.
    Measured, one row against two for every pair (CPU, one thread, forward and backward of a DPO
    step, best of 5 interleaved: benchmarks/shared_prompt_bench.py), the rule picked the faster
    side every time: demo pairs (prompts 14, replies 11 and 21 tokens) on `tiny` 1.31x and on
    `small` 1.34x; `small` with prompts 3 / 57 / 112 and replies 30: 1.10x / 1.46x / 1.64x;
    SmolLM2-shaped (4 layers) with prompts 306 / 77 and replies 70 / 110: 1.41x / 1.16x; kept
    two rows: `small` with prompts 3 or 24 and replies 230-260: 0.92x, SmolLM2-shaped with
    prompts 4 and replies 250: 0.97x. Not measured on a GPU, where the two-row path's unpadded
    groups take SDPA's causal kernel and the [T, T] mask may cost more.
    """
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_token = config.hidden_size * (2 * q + 2 * kv + 3 * config.intermediate_size)
    per_key = 2 * q  # q . k and the weighted sum of v

    def gain(a: Encoded, b: Encoded) -> int:
        p, c, r = a.prompt_len, len(a.ids) - a.prompt_len, len(b.ids) - b.prompt_len
        return p * per_token - (2 * c * r - p * p) * per_key

    return [shares_prompt(a, b) and gain(a, b) > 0 for a, b in pairs]


def _share_flags(model: nn.Module, pairs: list[tuple[Encoded, Encoded]], shared) -> list[bool]:
    """Which pairs take one row: `shared` as pair_logprobs reads it (None, True, False, or a flag per pair)."""
    if shared is None:
        return worth_sharing(pairs, _bare(model).config)
    if isinstance(shared, bool):
        return [shared and shares_prompt(a, b) for a, b in pairs]
    return [s and shares_prompt(a, b) for s, (a, b) in zip(shared, pairs)]


def pair_logprobs(model: nn.Module, pairs: list[tuple[Encoded, Encoded]], pad_id: int, device, groups: int = 1,
                  shared: bool | list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of both sequences of each pair and their counted tokens, [2, N] each (row 0
    the first sequences, row 1 the second), with gradients when enabled; in `groups` length groups.

    shared: one row per pair, the prompt run once (pairs that do not share their prompt take two
    rows); False: two rows per pair; None: one row for the pairs where that is faster
    (worth_sharing), two rows for the rest. model may be wrapped (DDP, compiled).
    """
    share = _share_flags(model, pairs, shared)
    if not any(share):  # the plain path, untouched: two rows per pair
        b = pad_batch([a for a, _ in pairs] + [s for _, s in pairs], pad_id)
        ids, attn, loss_mask = (b[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))

        def two_rows(rows, width):
            return chunked_sequence_logprobs(model, ids[rows, :width], attention_mask=attn[rows, :width],
                                             loss_mask=loss_mask[rows, :width])

        lp, n = in_length_groups(two_rows, attn, groups)
        return lp.view(2, -1), n.view(2, -1)
    b = {k: v.to(device) for k, v in pad_shared_prompt(pairs, pad_id, share).items()}

    def one_row(rows, width):
        return shared_prompt_logprobs(model, b["input_ids"][rows, :width], b["loss_mask"][rows, :width],
                                      b["prompt_lengths"][rows], b["splits"][rows], b["lengths"][rows])

    sums, counts = in_length_groups(one_row, b["attention_mask"], groups)
    where = torch.stack([b["first"], b["second"]])
    return sums.flatten()[where], counts.flatten()[where]


@torch.no_grad()
def pair_sequence_logps(model: Transformer, pairs: list[tuple[Encoded, Encoded]], batch_size: int,
                        desc: str | None = None, shared: bool | list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of [first, second, first, second, ...] (each pair's two sequences in turn) on the
    CPU, no gradients, in length-sorted batches of pairs; the prompt runs once where that is
    faster (pair_logprobs; shared as there). desc: show progress with an ETA under that name.
    """
    share = _share_flags(model, pairs, shared)
    if not any(share):
        return sequence_logps(model, [e for pair in pairs for e in pair], 0, batch_size, desc=desc)
    out_lp, out_n = torch.zeros(2 * len(pairs)), torch.zeros(2 * len(pairs), dtype=torch.long)
    model.eval()
    device = device_of(model)
    bar = progress(2 * len(pairs), desc, unit="seq") if desc else None
    lengths = [len(a.ids) + len(b.ids) - (a.prompt_len if s else 0) for (a, b), s in zip(pairs, share)]
    for chunk in _sorted_batches(lengths, batch_size):
        lp, n = pair_logprobs(model, [pairs[j] for j in chunk], 0, device, shared=[share[j] for j in chunk])
        idx = torch.tensor(chunk)
        out_lp[2 * idx], out_lp[2 * idx + 1] = lp[0].float().cpu(), lp[1].float().cpu()
        out_n[2 * idx], out_n[2 * idx + 1] = n[0].cpu(), n[1].cpu()
        if bar is not None:
            bar.update(2 * len(chunk))
    if bar is not None:
        bar.close()
    return out_lp, out_n


# ---------------------------------------------------------------- reward scores
class SequenceScores(nn.Module):
    """A reward model whose forward is `Transformer.sequence_scores` ([B] at each row's last real
    token): what reward training hands the Trainer, so DDP/FSDP see the scoring forward pass."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.sequence_scores(input_ids, attention_mask=attention_mask)


def last_token_scores(model: Transformer | SequenceScores, ids: torch.Tensor, attn: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Rewards of right-padded rows [B] in length groups (with gradients when enabled).

    model: a Transformer with a score head, or the (possibly DDP-wrapped) SequenceScores of one.
    """
    score = model.sequence_scores if isinstance(model, Transformer) else model
    return in_length_groups(lambda rows, width: score(ids[rows, :width], attn[rows, :width]), attn, groups)


@torch.no_grad()
def encoded_scores(model: Transformer | SequenceScores, sequences: list[list[int]], pad_id: int,
                   batch_size: int = 64) -> list[float]:
    """Reward of each token sequence, scored at its last token; equal sequences are scored once
    (so equal texts get exactly equal rewards), in batches of similar length."""
    unique = sorted({tuple(s) for s in sequences}, key=len)
    score = model.sequence_scores if isinstance(model, Transformer) else model
    device = device_of(model)
    values: dict[tuple, float] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        ids, mask = _right_padded([list(c) for c in chunk], pad_id)
        values.update(zip(chunk, score(ids.to(device), attention_mask=mask.to(device)).float().cpu().tolist()))
    return [values[tuple(s)] for s in sequences]


def reward_scores(rm: Transformer, tokenizer: Tokenizer, items: list[tuple[list[dict], list[dict]]],
                  batch_size: int = 64) -> tuple[list[float], int]:
    """Reward of each (prompt messages, reply messages): the chat rendering of prompt + reply
    (encode_completion, cut to the model's context), scored at its last token.

    Returns (rewards, how many were truncated).
    """
    max_len = rm.config.max_position_embeddings
    encoded = [encode_completion(tokenizer, p, r, max_len) for p, r in items]
    return encoded_scores(rm, [e.ids for e in encoded], tokenizer.pad_id, batch_size), sum(e.truncated for e in encoded)


class RewardScorer:
    """Scores replies (text) to prompts (chat messages) with a reward model artifact: a reward source."""

    def __init__(self, ws, ref: str, option: str = "--reward-model", device="cpu"):
        from prefcli.artifacts import load_model_artifact

        loaded = load_model_artifact(ws, ref, option, kind="reward", device=device)
        self.model, self.tokenizer, self.path, self.device = loaded.model.eval(), loaded.tokenizer, loaded.path, device
        self.parent = loaded.parent()

    def __call__(self, prompts: list[list[dict]], replies: list[str], batch_size: int = 32) -> list[float]:
        items = [(p, [{"role": "assistant", "content": r}]) for p, r in zip(prompts, replies)]
        return reward_scores(self.model, self.tokenizer, items, batch_size)[0]


# ---------------------------------------------------------------- sampling
def sample_ids(model: Transformer, tok: Tokenizer, prompt_ids: list[list[int]], *, samples: int = 1,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, max_tokens: int = 64,
               seed: int | torch.Generator = 0, batch_size: int = 64, chat: bool = True, bar=None,
               embed_offset: torch.Tensor | None = None) -> list[dict]:
    """`samples` replies to each prompt (token ids), flat: prompt i's sample j at i * samples + j.

    Each: prompt_ids, tokens (the stop token included when hit), logprobs (raw, from
    generate), finished, length (tokens without the stop token), text. One generator (seeded
    with `seed`, or the one given) draws every batch, so the same seed gives the same replies.
    Equal prompts in a batch are prefilled once (`generate`).
    """
    order = [i for i in range(len(prompt_ids)) for _ in range(samples)]
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator(device=device_of(model)).manual_seed(seed)
    stop = tok.stop_ids(chat=chat)
    out = []
    for first in range(0, len(order), batch_size):
        idx = order[first:first + batch_size]
        done = generate(model, [prompt_ids[i] for i in idx], max_new_tokens=max_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, stop_ids=stop, pad_id=tok.pad_id, seed=gen,
                        embed_offset=embed_offset)
        for i, c in zip(idx, done):
            content = c.tokens[:-1] if c.finished else c.tokens
            out.append({"prompt_ids": prompt_ids[i], "tokens": c.tokens, "logprobs": c.logprobs,
                        "finished": c.finished, "length": len(content),
                        "text": tok.decode(content, skip_special_tokens=True)})
        if bar is not None:
            bar.update(1)
    return out


def sample_replies(lm, prompts: list[list[dict]], *, samples: int = 1, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, max_tokens: int = 64, seed: int | torch.Generator = 0,
                   batch_size: int = 64, bar=None, embed_offset: torch.Tensor | None = None) -> list[dict]:
    """`samples` replies per prompt (chat messages) from a loaded model (.model, .tokenizer); see sample_ids.

    Every model draws from its own generator seeded with `seed` (common random numbers: two
    copies of one model sample the very same replies). embed_offset: a steering vector (`prefcli.steer`).
    """
    tok = lm.tokenizer
    prompt_ids = [tok.chat_ids(m, add_generation_prompt=True) for m in prompts]
    return sample_ids(lm.model, tok, prompt_ids, samples=samples, temperature=temperature, top_k=top_k, top_p=top_p,
                      max_tokens=max_tokens, seed=seed, batch_size=batch_size, bar=bar, embed_offset=embed_offset)
