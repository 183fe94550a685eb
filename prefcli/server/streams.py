"""A request in flight: its engine jobs, and their tokens turned into text.

A request becomes n engine jobs (one per choice and prompt). Their tokens come back from the
engine thread, are decoded incrementally (the chat REPL's StreamDecoder) and cut at `stop`
strings; tokens that arrived together leave as one piece per choice.
"""

from __future__ import annotations

import asyncio
from collections import deque

from prefcli.server.engine import Job, QueueFull
from prefcli.server.schemas import APIError, ServedModel, Settings
from prefcli.conversation import StreamDecoder


class ChoiceText:
    """A choice's tokens in, text out: decoded incrementally and cut at the first stop string.

    Text that could be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, served: ServedModel, stops: list[str]):
        self.decoder = StreamDecoder(served.loaded.tokenizer)
        self.stop_ids = set(served.loaded.tokenizer.stop_ids(chat=served.kind == "chat"))
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.tokens = 0
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        """Text that can be sent after this token ("" if none)."""
        self.tokens += 1
        if token in self.stop_ids:
            return ""
        self.text += self.decoder.push(token)
        return self._ready(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._ready(final=True)

    def whole(self) -> str:
        """The final text: the reply decoded in one go (as `prefcli chat` does), or cut at a stop string."""
        if self.stopped:
            return self.text
        ids = self.decoder.ids
        return self.decoder.tok.decode(ids[:-1] if ids and ids[-1] in self.stop_ids else ids)

    def _ready(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stops:
            start = max(0, self.sent - self.hold)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.stopped = True
                final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece


class Run:
    """The jobs of one request and the queue their events arrive on (in the server's event loop)."""

    def __init__(self, served: ServedModel, prompts: list[list[int]], s: Settings):
        self.served = served
        self.loop = asyncio.get_running_loop()
        # Events from the engine thread: appended there, read here. The loop is woken once per
        # batch of events, not once per token (each wake-up is a write to the loop's self-pipe).
        self.events: deque[tuple[int, int | None]] = deque()
        self.ready = asyncio.Event()
        self.wake_pending = False
        stop_ids = served.loaded.tokenizer.stop_ids(chat=served.kind == "chat")
        self.jobs, self.texts = [], []
        for prompt in prompts:
            budget = served.engine.max_len - len(prompt)
            max_tokens = budget if s.max_tokens is None else min(s.max_tokens, budget)
            group = object()  # the n choices of one prompt are prefilled once
            for j in range(s.n):
                seed = None if s.seed is None else (s.seed + j) % 2 ** 63  # choice j: seed + j, so choices differ
                self.jobs.append(Job(prompt, max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                     stop_ids=stop_ids, seed=seed, embed_offset=s.offset, group=group,
                                     on_event=self._on_event))
                self.texts.append(ChoiceText(served, s.stop))
        self.index = {id(job): i for i, job in enumerate(self.jobs)}
        self.prompt_tokens = sum(len(p) for p in prompts)

    def _on_event(self, job: Job, token: int | None) -> None:  # engine thread
        self.events.append((self.index[id(job)], token))
        if not self.wake_pending:
            self.wake_pending = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # event loop
        self.wake_pending = False
        self.ready.set()

    def start(self) -> None:
        try:
            self.served.engine.submit(self.jobs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; try again shortly", None, "queue_full",
                           "rate_limit_error") from None

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()
        self.served.engine.wake()

    @property
    def completion_tokens(self) -> int:
        return sum(t.tokens for t in self.texts)

    def finish_reason(self, i: int) -> str:
        if self.texts[i].stopped:
            return "stop"
        job = self.jobs[i]
        if job.finish_reason == "error":
            raise APIError(500, f"generation failed: {job.error}", None, "server_error", "server_error")
        return "length" if job.finish_reason == "length" else "stop"

    async def _next_events(self) -> list[tuple[int, int | None]]:
        """Every event that has arrived (waiting for one if none has)."""
        while not self.events:
            self.ready.clear()
            if not self.events:
                await self.ready.wait()
        out = []
        while self.events:
            out.append(self.events.popleft())
        return out

    async def pieces(self):
        """(choice, text) as tokens arrive, then (choice, None) when the choice is done.

        Tokens that arrived together go out as one piece per choice (one SSE chunk, not one per
        token): when the event loop falls behind the engine, it catches up in fewer sends.
        """
        left = len(self.jobs)
        while left:
            ready: dict[int, str] = {}
            done: list[int] = []
            for i, token in await self._next_events():
                text = self.texts[i]
                if token is None:
                    ready[i] = ready.get(i, "") + text.finish()
                    done.append(i)
                    continue
                if text.stopped:
                    continue
                ready[i] = ready.get(i, "") + text.push(token)
                if text.stopped:
                    self.jobs[i].cancel()
                    self.served.engine.wake()
            for i, piece in ready.items():
                if piece:
                    yield i, piece
            for i in done:
                yield i, None
            left -= len(done)
