"""Continuous batching: one background decode loop per model, requests joining and leaving it.

Each decode step feeds every running row its last token and samples the next. Between
steps, waiting jobs join: their prompts are prefilled together in one left-padded pass (a
prompt alone is exactly what `prefcli chat` computes) and their cache rows are appended to
the running cache; rows that
finished (stop token, max_tokens) or were cancelled (a client gone) leave it at once.

The running cache (prefcli.model.KVCache) has one write position for all rows, so rows
are kept right-aligned: row b's real tokens are the last `seen[b]` positions before
`length`, and the positions before them are masked. Joining (or running out of room)
repacks the cache: the rows' real tokens are copied into a fresh cache, right-aligned at
the longest row, with room to grow. Positions come from each row's own token count, so
where a row sits in the cache changes nothing it computes.

Sampling reuses prefcli.generate.sample_next with each job's own settings; a job with a
seed draws from its own generator, so its reply does not depend on what it was batched with.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

import torch

from prefcli.generate import _next_logits, sample_next
from prefcli.model import KVCache, Transformer, fused_projections


class QueueFull(Exception):
    """The engine's waiting queue is full (the HTTP layer answers 429)."""


class Job:
    """One completion: its prompt ids, sampling settings, and where its tokens go.

    on_event(job, token) is called from the engine thread for each new token (the stop
    token included), and once with token None when the job is done; `finish_reason` is
    then "stop" (a stop token), "length" (max_tokens), "cancelled" or "error" (`error`).
    Jobs with the same `group` (the n choices of one request) share a prompt and offset,
    and are prefilled once.
    """

    def __init__(self, prompt: list[int], max_tokens: int, *, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, stop_ids=(), seed: int | None = None, embed_offset: torch.Tensor | None = None,
                 on_event: Callable[["Job", int | None], None] | None = None, group: object | None = None):
        if not prompt:
            raise ValueError("a job needs at least one prompt token")
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.stop_ids = set(stop_ids)
        self.seed = seed
        self.embed_offset = embed_offset  # [hidden] steering offset, or None
        self.on_event = on_event
        self.group = group if group is not None else self
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to drop this job; it leaves the batch before the next decode step."""
        self.cancelled = True

    def _emit(self, token: int | None) -> None:
        if self.on_event is not None:
            try:
                self.on_event(self, token)
            except RuntimeError:  # the listener's event loop is gone (server shutting down)
                self.cancelled = True

    def _push(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        self._emit(token)
        if self.done:
            self._emit(None)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if not self.done:
            self.finish_reason, self.error = reason, error
            self._emit(None)


class BatchEngine:
    """A model's decode loop on a background thread; `submit` jobs, read their tokens via on_event.

    max_batch: rows decoded together; max_queue: jobs waiting to join (more: QueueFull).
    max_len: the most tokens a job may hold, prompt and reply (default: the model's
    context, at most 4096); callers keep len(prompt) + max_tokens <= max_len.
    """

    def __init__(self, model: Transformer, *, max_batch: int = 16, max_queue: int = 64,
                 max_len: int | None = None, name: str = "model"):
        if model.lm_head is None:
            raise ValueError("a batch engine needs a model with an lm_head")
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = max_len or min(model.config.max_position_embeddings, 4096)
        self.device = model.model.embed_tokens.weight.device
        self.rows: list[Job] = []  # cache row i decodes rows[i]
        self.cache: KVCache | None = None
        self.max_rows = 0  # the most rows one decode step ran (what batching achieved)
        self.steps = 0  # decode steps run
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"prefcli-serve-{name}", daemon=True)
        self._thread.start()

    # ---- the caller's side (any thread)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self.rows)

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs to join the batch at the next step; QueueFull when the queue has no room for them all."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the most is {self.max_queue})")
            for job in jobs:
                if job.seed is not None:
                    job.generator = torch.Generator(device=self.device).manual_seed(job.seed)
            self._pending.extend(jobs)
            self._cond.notify()

    def wake(self) -> None:
        """Let the loop see cancellations now (it also sees them before every step)."""
        with self._cond:
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the loop (engine thread)

    def _loop(self) -> None:
        with torch.inference_mode(), fused_projections(self.model):
            while True:
                with self._cond:
                    while not self._stopping and not self._pending and not self.rows:
                        self._cond.wait()
                    if self._stopping:
                        break
                    joining = []
                    while self._pending and len(self.rows) + len(joining) < self.max_batch:
                        joining.append(self._pending.popleft())
                try:
                    self._drop_cancelled()
                    if joining:
                        self._admit(joining)
                    if self.rows:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a failed step fails its jobs, the server goes on
                    for job in self.rows + joining:
                        job._finish("error", e)
                    self.rows, self.cache = [], None
        for job in self.rows + list(self._pending):
            job._finish("cancelled")

    def _drop_cancelled(self) -> None:
        keep = [i for i, job in enumerate(self.rows) if not job.cancelled]
        if len(keep) == len(self.rows):
            return
        for job in self.rows:
            if job.cancelled:
                job._finish("cancelled")
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.cache = [], None
            return
        order = self.cache.keep_rows(keep)
        self.rows = [self.rows[i] for i in order]

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new prompts (each distinct one once, all in one left-padded pass), sample
        their first tokens, and append the rows still going to the running batch."""
        groups: dict[int, list[Job]] = {}
        for job in jobs:
            if job.cancelled:
                job._finish("cancelled")
            else:
                groups.setdefault(id(job.group), []).append(job)
        if not groups:
            return
        firsts = [g[0] for g in groups.values()]
        longest = max(len(j.prompt) for j in firsts)
        ids = torch.zeros(len(firsts), longest, dtype=torch.long)
        mask = torch.zeros(len(firsts), longest, dtype=torch.long)
        for b, job in enumerate(firsts):
            ids[b, longest - len(job.prompt):] = torch.tensor(job.prompt)
            mask[b, longest - len(job.prompt):] = 1
        padded = not bool(mask.all())
        offsets = None
        if any(j.embed_offset is not None for j in firsts):
            zero = torch.zeros(self.model.config.hidden_size)
            offsets = torch.stack([zero if j.embed_offset is None else j.embed_offset.float().cpu() for j in firsts])
            offsets = offsets.to(self.device, self.model.model.embed_tokens.weight.dtype)
        cache = KVCache.for_model(self.model, len(firsts), longest)
        logits = _next_logits(self.model, ids.to(self.device), cache, embed_offset=offsets,
                              attention_mask=mask.to(self.device) if padded else None)
        rows: list[int] = []
        joined: list[Job] = []
        for b, group in enumerate(groups.values()):
            for job, token in zip(group, self._sample(logits[b:b + 1].expand(len(group), -1), group)):
                job._push(token)
                if not job.done:
                    rows.append(b)
                    joined.append(job)
        if joined:
            parts = [(self.cache, list(range(len(self.rows))))] if self.rows else []
            self.cache = self._repack(parts + [(cache, rows)])
            self.rows = self.rows + joined

    def _step(self) -> None:
        """One decode step for every row: feed its last token, sample the next, let finished rows go."""
        if self.cache.length >= self.cache.max_len:
            self.cache = self._repack([(self.cache, list(range(len(self.rows))))])
        ids = torch.tensor([[job.tokens[-1]] for job in self.rows], dtype=torch.long, device=self.device)
        logits = _next_logits(self.model, ids, self.cache, embed_offset=self._offsets())
        self.steps += 1
        self.max_rows = max(self.max_rows, len(self.rows))
        keep = []
        for i, (job, token) in enumerate(zip(self.rows, self._sample(logits, self.rows))):
            job._push(token)
            if not job.done:
                keep.append(i)
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _offsets(self) -> torch.Tensor | None:
        """Per-row steering offsets [B, hidden] (zeros for rows without), or None when no row steers."""
        if all(job.embed_offset is None for job in self.rows):
            return None
        zero = torch.zeros(self.model.config.hidden_size, device=self.device)
        return torch.stack([zero if j.embed_offset is None else j.embed_offset.to(self.device) for j in self.rows])

    def _sample(self, logits: torch.Tensor, jobs: list[Job]) -> list[int]:
        """Next token of each row of logits [B, V]: rows with equal settings (and no seed) draw together."""
        out: list[int] = [0] * len(jobs)
        together: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            if job.generator is not None and job.temperature > 0:
                out[i] = int(sample_next(logits[i:i + 1], job.temperature, job.top_k, job.top_p, job.generator))
            else:
                together.setdefault((job.temperature, job.top_k, job.top_p), []).append(i)
        for (temperature, top_k, top_p), rows in together.items():
            part = logits if len(rows) == len(jobs) else logits[torch.tensor(rows, device=logits.device)]
            for i, token in zip(rows, sample_next(part, temperature, top_k, top_p).tolist()):
                out[i] = token
        return out

    def _repack(self, parts: list[tuple[KVCache, list[int]]]) -> KVCache:
        """One cache holding these rows of these caches (in order), right-aligned at the longest row,
        with room to decode a while before the next repack."""
        lengths = torch.cat([cache.seen[rows] for cache, rows in parts])
        longest = int(lengths.max())
        width = min(longest + max(64, longest // 2), 2 * self.max_len)
        new = KVCache.for_model(self.model, len(lengths), width)
        for t in new.k + new.v:  # padding is masked, but 0 x NaN from uninitialised memory is still NaN
            t[:, :, :longest].zero_()
        new.key_mask[:, :longest] = False
        b = 0
        for cache, rows in parts:
            m = min(cache.length, longest)  # every row's real tokens are in the last `longest` positions
            src = slice(cache.length - m, cache.length)
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            for dst, t in zip(new.k + new.v, cache.k + cache.v):
                dst[b:b + len(rows), :, longest - m:longest] = t[:, :, src].index_select(0, index)
            new.key_mask[b:b + len(rows), longest - m:longest] = cache.key_mask[:, src].index_select(0, index)
            b += len(rows)
        new.seen = lengths.clone()
        new.length = longest
        new.has_padding = not bool(new.key_mask[:, :longest].all())
        return new
