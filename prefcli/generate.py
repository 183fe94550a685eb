"""Sampling engine: batched decoding with one preallocated KV cache, stop tokens, streaming.

Kept apart from the model (as nanochat's engine.py is). `generate` serves eval and
online RL (many prompts at once); `ChatSession` serves the chat REPL (one conversation
whose KV cache lives across turns).

Log-probs: every sampled token comes with its log-probability under the *raw* model
distribution, log_softmax(logits) at temperature 1 with no top-k/top-p filtering. That
is the quantity online RL (PPO, GRPO) needs for ratios and KL, whatever the sampling
settings were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from prefcli.errors import PrefcliError
from prefcli.model import KVCache, Transformer, fused_projections
from prefcli.static_decode import StaticDecoder, plain_linears


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)  # new tokens, the stop token included if hit
    logprobs: list[float] = field(default_factory=list)  # raw model log-prob of each token (temperature 1)
    finished: bool = False  # True when a stop token ended it (False: ran out of max_new_tokens)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering: tokens left out get -inf. logits: [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always the first).
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        remove_sorted = probs.cumsum(-1) - probs >= top_p  # the better tokens already reach top_p
        remove_sorted[:, 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_rows(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of weights [B, V] (>= 0, each row with a positive sum), drawn with
    probability weight / row sum: inverse CDF with one uniform per row.

    Exact up to float64 rounding of the running sums; much cheaper than torch.multinomial,
    which dominated decoding on CPU.
    """
    u = torch.rand(weights.shape[0], 1, dtype=torch.float64, device=weights.device, generator=generator)
    return inverse_cdf(weights, u)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index each uniform u [B, 1] in [0, 1) selects from weights [B, V] (see sample_rows)."""
    cdf = weights.double().cumsum(-1)
    # A target in (0, total]: the first index whose running sum reaches it always exists and has
    # a positive weight (a zero weight adds nothing, so it can never be the first to reach it).
    target = (1 - u) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1:
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    # exp(logits - max): the softmax without its division (sample_rows takes unnormalised weights).
    return sample_rows((logits - logits.amax(-1, keepdim=True)).exp(), generator)


def _generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device).manual_seed(seed)


def _sample_with_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next ids [B] and their raw log-probs (log_softmax of the logits as they are: temperature 1, no filter)."""
    logits = logits.float()
    if temperature == 1 and not top_k and top_p >= 1:  # online RL's case: one exp serves the draw and the log-prob
        shifted = logits - logits.amax(-1, keepdim=True)
        weights = shifted.exp()  # softmax numerators
        next_ids = sample_rows(weights, generator)
        return next_ids, shifted.gather(-1, next_ids[:, None]).squeeze(-1) - weights.sum(-1).log()
    next_ids = sample_next(logits, temperature, top_k, top_p, generator)
    return next_ids, torch.log_softmax(logits, dim=-1).gather(-1, next_ids[:, None]).squeeze(-1)


def _next_logits(model: Transformer, ids: torch.Tensor, cache: KVCache,
                 attention_mask: torch.Tensor | None = None,
                 embed_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ids [B, T] into the cache; logits [B, V] for the token after the last one."""
    hidden = model(ids, attention_mask=attention_mask, kv_cache=cache, return_hidden=True,
                   embed_offset=embed_offset)
    return model.lm_head(hidden[:, -1])


def _decode(model: Transformer, cache: KVCache, logits: torch.Tensor, completions: list[Completion],
            max_new_tokens: int, temperature: float, top_k: int, top_p: float, stop_ids,
            generator: torch.Generator | None, on_token: Callable[[int, int], None] | None,
            embed_offset: torch.Tensor | None = None) -> None:
    """Sample up to max_new_tokens for every row of the cache, appending to completions.

    The last sampled token is not fed back (nothing needs its logits). Finished rows leave
    the cache (and a per-row embed_offset) so the rest decode without them. Tokens and
    log-probs stay in tensors until the end: no per-row Python work per step.
    """
    if max_new_tokens <= 0:
        return
    stop = torch.tensor(sorted({stop_ids} if isinstance(stop_ids, int) else set(stop_ids)), dtype=torch.long,
                        device=logits.device)
    rows = len(completions)
    tokens = torch.empty(max_new_tokens, rows, dtype=torch.long, device=logits.device)  # [step, row]
    logprobs = torch.empty(max_new_tokens, rows, dtype=torch.float32, device=logits.device)
    ends = [max_new_tokens] * rows  # number of tokens of each row
    active = list(range(rows))  # cache row i belongs to completions[active[i]]
    where = torch.arange(rows, device=logits.device)  # the same, as a tensor
    for step in range(max_new_tokens):
        next_ids, next_logprobs = _sample_with_logprobs(logits, temperature, top_k, top_p, generator)
        tokens[step].index_copy_(0, where, next_ids)
        logprobs[step].index_copy_(0, where, next_logprobs)
        if on_token is not None:
            for row, token in sorted(zip(active, next_ids.tolist())):
                on_token(row, token)
        keep = range(len(active))
        if len(stop):
            done = torch.isin(next_ids, stop)
            if bool(done.any()):
                keep = []
                for i, d in enumerate(done.tolist()):
                    if d:
                        ends[active[i]] = step + 1
                        completions[active[i]].finished = True
                    else:
                        keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            order = cache.keep_rows(keep)
            next_ids = next_ids[order]
            active = [active[i] for i in order]
            where = torch.tensor(active, device=logits.device)
            if embed_offset is not None and embed_offset.dim() == 2 and embed_offset.shape[0] > 1:
                embed_offset = embed_offset[order]
        logits = _next_logits(model, next_ids[:, None], cache, embed_offset=embed_offset)
    for c, end, toks, lps in zip(completions, ends, tokens.T.tolist(), logprobs.T.tolist()):
        c.tokens.extend(toks[:end])
        c.logprobs.extend(lps[:end])


def _decode_static(decoder: StaticDecoder, logits: torch.Tensor, completions: list[Completion],
                   max_new_tokens: int, temperature: float, top_k: int, top_p: float, stop_ids,
                   generator: torch.Generator | None, on_token: Callable[[int, int], None] | None) -> None:
    """`_decode` for a batch whose shape never changes (a CUDA graph's): finished rows keep
    decoding and their tokens are dropped at the end, instead of leaving the cache."""
    if max_new_tokens <= 0:
        return
    device = logits.device
    stop = torch.tensor(sorted({stop_ids} if isinstance(stop_ids, int) else set(stop_ids)), dtype=torch.long,
                        device=device)
    rows = len(completions)
    tokens = torch.empty(max_new_tokens, rows, dtype=torch.long, device=device)
    logprobs = torch.empty(max_new_tokens, rows, dtype=torch.float32, device=device)
    ends = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_ids, next_logprobs = _sample_with_logprobs(logits, temperature, top_k, top_p, generator)
        tokens[step], logprobs[step] = next_ids, next_logprobs
        if on_token is not None:
            finished = done.tolist()
            for row, token in enumerate(next_ids.tolist()):
                if not finished[row]:
                    on_token(row, token)
        if len(stop):
            hit = torch.isin(next_ids, stop) & ~done
            ends = torch.where(hit, step + 1, ends)
            done |= hit
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        logits = decoder(next_ids)
    for c, end, finished, toks, lps in zip(completions, ends.tolist(), done.tolist(), tokens.T.tolist(),
                                           logprobs.T.tolist()):
        c.tokens.extend(toks[:end])
        c.logprobs.extend(lps[:end])
        c.finished = finished


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_ids=(), pad_id: int = 0,
             seed: int | torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None,
             embed_offset: torch.Tensor | None = None, static: bool | None = None) -> list[Completion]:
    """Complete each prompt (token ids) with up to max_new_tokens sampled tokens.

    Prompts are left-padded with pad_id into one batch sharing one KV cache; a row stops
    at its first token in stop_ids. temperature 0 = greedy. seed: an int or a
    torch.Generator makes sampling repeatable (None uses torch's global RNG).
    on_token(row, token_id) is called for every new token, stop tokens included.
    embed_offset: [hidden] (every row) or [B, hidden] (per row), added to the embedding of
    every token, prompt and reply (a steering vector, `prefcli.steer`).
    static: decode with fixed shapes, replayed from a CUDA graph (default: on CUDA, where
    decoding is bound by kernel launches); finished rows then stay in the batch.
    """
    if model.lm_head is None:
        raise ValueError("generate needs a model with an lm_head")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    completions = [Completion() for _ in prompts]
    if not prompts or max_new_tokens <= 0:
        return completions
    device = model.model.embed_tokens.weight.device
    # Online RL samples several replies per prompt: prefill each distinct prompt once and copy its
    # cache rows (unless per-row steering vectors make equal prompts differ).
    distinct, row_of = prompts, None
    if embed_offset is None or embed_offset.dim() == 1 or embed_offset.shape[0] == 1:
        first: dict[tuple[int, ...], int] = {}
        row_of = [first.setdefault(tuple(p), len(first)) for p in prompts]
        distinct = [list(p) for p in first]
    longest = max(len(p) for p in distinct)
    ids = torch.full((len(distinct), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(distinct), longest), dtype=torch.long)
    for i, p in enumerate(distinct):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    if bool(mask.all()):
        mask = None  # equal lengths: no padding mask, plain causal attention

    with fused_projections(model):
        cache = KVCache.for_model(model, len(distinct), longest + max_new_tokens)
        # [1, hidden] (every row) or [B, hidden] (per row); both broadcast over the tokens.
        offset = None if embed_offset is None else embed_offset.to(device).reshape(-1, embed_offset.shape[-1])
        logits = _next_logits(model, ids, cache, attention_mask=mask, embed_offset=offset)
        if len(distinct) < len(prompts):
            cache.select_rows(row_of)
            logits = logits[row_of]
        if static is None:
            static = device.type == "cuda" and plain_linears(model)
        if static and max_new_tokens > 1:
            decoder = StaticDecoder(model, cache, offset)
            _decode_static(decoder, logits, completions, max_new_tokens, temperature, top_k, top_p,
                           stop_ids, _generator(seed, device), on_token)
        else:
            _decode(model, cache, logits, completions, max_new_tokens, temperature, top_k, top_p,
                    stop_ids, _generator(seed, device), on_token, offset)
    return completions


class ChatSession:
    """One conversation whose KV cache lives across turns (the chat REPL's engine).

    append(ids) prefills only the new ids; sample() continues from everything so far.
    `tokens` is the whole conversation; `length` its size; `max_len` the most it can hold
    (default: the model's context, at most 4096). embed_offset [hidden]: a steering vector
    added to every token's embedding (`prefcli.steer`); set_embed_offset changes it.
    """

    def __init__(self, model: Transformer, max_len: int | None = None, embed_offset: torch.Tensor | None = None):
        if model.lm_head is None:
            raise ValueError("a chat session needs a model with an lm_head")
        self.model = model
        self.max_len = max_len or min(model.config.max_position_embeddings, 4096)
        self.cache = KVCache.for_model(model, 1, self.max_len)
        self.embed_offset = None if embed_offset is None else embed_offset.reshape(1, -1).to(self.cache.seen.device)
        self.tokens: list[int] = []
        self.finished = False  # did the last sample() end on a stop token
        self._fed = 0  # tokens[:_fed] are in the cache
        self._logits: torch.Tensor | None = None  # next-token logits after tokens[:_fed]

    @property
    def length(self) -> int:
        return len(self.tokens)

    @torch.inference_mode()
    def _feed(self) -> None:
        new = self.tokens[self._fed:]
        if new:
            ids = torch.tensor([new], dtype=torch.long, device=self.cache.seen.device)
            with fused_projections(self.model):
                self._logits = _next_logits(self.model, ids, self.cache, embed_offset=self.embed_offset)
            self._fed = len(self.tokens)

    def append(self, ids: list[int]) -> None:
        """Add tokens (a user turn, a generation prompt) and prefill them."""
        if self.length + len(ids) > self.max_len:
            raise PrefcliError(
                f"the conversation would be {self.length + len(ids)} tokens; the model holds {self.max_len}",
                "drop old turns (drop/truncate) or start over (reset)",
            )
        self.tokens.extend(ids)
        self._feed()

    @torch.inference_mode()
    def sample(self, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               stop_ids=(), on_token: Callable[[int], None] | None = None,
               seed: int | torch.Generator | None = None) -> list[int]:
        """Sample a continuation (stop token included if hit), add it to the conversation, return it.

        Stops early when the conversation reaches max_len. on_token(token_id) streams each token.
        """
        self._feed()
        if self._logits is None:
            raise ValueError("append a prompt before sampling")
        completion = Completion()
        budget = min(max_new_tokens, self.max_len - self.length)
        stream = (lambda _row, token: on_token(token)) if on_token is not None else None
        with fused_projections(self.model):
            _decode(self.model, self.cache, self._logits, [completion], budget, temperature, top_k, top_p,
                    stop_ids, _generator(seed, self.cache.seen.device), stream, self.embed_offset)
        self.finished = completion.finished
        # The cache now also holds all sampled tokens but the last; that one is fed with the next turn.
        self.tokens.extend(completion.tokens)
        self._fed = max(self.length - 1, self._fed)
        self._logits = None if completion.tokens else self._logits
        return completion.tokens

    def reset(self) -> None:
        """Forget the conversation."""
        self.truncate(0)

    def set_embed_offset(self, embed_offset: torch.Tensor | None) -> None:
        """Steer from now on; the conversation so far is kept and prefilled again with the new offset."""
        self.embed_offset = None if embed_offset is None else embed_offset.reshape(1, -1).to(self.cache.seen.device)
        self.cache.crop(0)
        self._fed = 0
        self._logits = None

    @torch.inference_mode()
    def truncate(self, n: int) -> None:
        """Keep the first n tokens (e.g. undo the last reply); the cache is cropped, not recomputed."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a conversation of {self.length} tokens to {n}")
        del self.tokens[n:]
        # Re-feed the last kept token so its logits are there for the next sample().
        keep = min(self._fed, max(n - 1, 0))
        self.cache.crop(keep)
        self._fed = keep
        self._logits = None

    def drop(self, start: int, end: int) -> None:
        """Remove tokens[start:end] (e.g. the oldest turns after the system prompt).

        What follows `end` moves to new positions, so it is prefilled again.
        """
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot drop tokens {start}:{end} of a conversation of {self.length}")
        rest = self.tokens[end:]
        self.truncate(start)
        self.tokens.extend(rest)
        self._feed()
