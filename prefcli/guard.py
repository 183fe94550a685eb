"""The collapse guard: stop (or warn about) a preference or RL run whose policy is collapsing.

A collapsing run can look fine in its summary (held-out pair accuracy 1.0, loss 0.0)
while its replies turn into ". perfectly. perfectly." or a bare "The". The signs show
in the metrics of each step, so the guard reads them as the run goes:

- preference methods: the policy's log-prob of the chosen replies ("logps/chosen",
  summed over the reply) falling far below where it started: the loss is being met by
  pushing every reply down, the rejected faster, not by preferring the chosen one;
- RL methods: the sampled replies' mean length ("reply_len") shrinking to a few
  tokens, or their distinct-2 ("distinct2": distinct token bigrams / bigrams, per
  reply) falling far below its start: the policy repeats itself.

"Start" is the mean of the first `warmup` values, "now" the mean of the last `window`
(single micro-batches are noisy). Mode "stop" raises RunCollapsed (exit 1, nothing
saved, the run's checkpoints kept); "warn" prints the line once and records it in the
model's metrics; "off" watches nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from prefcli.errors import PrefcliError, RuntimeFailure

MODES = ("stop", "warn", "off")


class RunCollapsed(RuntimeFailure):
    """The guard stopped a collapsing run (a runtime failure: exit code 1)."""

    exit_code = 1


@dataclass
class Thresholds:
    # preference: fire when chosen log-prob falls by more than max(logp_drop, logp_drop_frac * |start|) nats
    logp_drop: float = 10.0
    logp_drop_frac: float = 0.5
    # RL: fire when the mean reply length falls below max(min_len, len_frac * start) tokens ...
    min_len: float = 3.0
    len_frac: float = 0.2
    # ... or distinct-2 falls below distinct_frac * start (and below distinct_floor)
    distinct_frac: float = 0.6
    distinct_floor: float = 0.5
    warmup: int = 5
    window: int = 10


WATCHED = {"preference": ("logps/chosen",), "rl": ("reply_len", "distinct2")}  # the metrics each kind reads


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PrefcliError(f"--guard {mode}: unknown mode", f"choose one of {', '.join(MODES)}")


def distinct_2(tokens: list) -> float:
    """Distinct bigrams / bigrams of one reply (1.0 for replies under two tokens)."""
    pairs = list(zip(tokens, tokens[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


class CollapseGuard:
    """Fed the metrics of every micro-batch; `check` returns the problem once one shows.

    kind: "preference" or "rl" (which signs to watch); fix: what the message tells the
    user to rerun with.
    """

    def __init__(self, mode: str = "stop", kind: str = "preference", fix: str = "", thresholds: Thresholds | None = None):
        check_mode(mode)
        self.mode, self.kind, self.fix = mode, kind, fix
        self.t = thresholds or Thresholds()
        self.start: dict[str, list[float]] = {}
        self.recent: dict[str, deque] = {}
        self.warning: str | None = None

    def _feed(self, key: str, value) -> tuple[float, float] | None:
        """(start, now) of a metric once both are known, else None."""
        if value is None:
            return None
        value = float(value)
        start = self.start.setdefault(key, [])
        if len(start) < self.t.warmup:
            start.append(value)
            return None
        recent = self.recent.setdefault(key, deque(maxlen=self.t.window))
        recent.append(value)
        if len(recent) < self.t.window:
            return None
        return sum(start) / len(start), sum(recent) / len(recent)

    def check(self, metrics: dict) -> str | None:
        """The collapse this step shows, as the first half of a sentence, or None."""
        t = self.t
        if self.kind == "preference":
            seen = self._feed("logps/chosen", metrics.get("logps/chosen"))
            if seen:
                start, now = seen
                if start - now > max(t.logp_drop, t.logp_drop_frac * abs(start)):
                    return f"chosen log-prob fell {start - now:.0f} nats below its start ({start:.1f} -> {now:.1f})"
            return None
        problem = None
        seen = self._feed("reply_len", metrics.get("reply_len"))
        if seen:
            start, now = seen
            if now < max(t.min_len, t.len_frac * start):
                problem = f"replies shrank from {start:.1f} to {now:.1f} tokens"
        seen = self._feed("distinct2", metrics.get("distinct2"))
        if seen and problem is None:
            start, now = seen
            if now < t.distinct_frac * start and now < t.distinct_floor:
                problem = f"replies repeat themselves (distinct-2 {start:.2f} -> {now:.2f})"
        return problem

    def observe(self, metrics: dict) -> None:
        """Check one micro-batch's metrics; stop or warn per the mode."""
        if self.mode == "off" or self.warning is not None:
            return
        problem = self.check(_mean_over_ranks(metrics, WATCHED[self.kind]))
        if problem is None:
            return
        message = f"{problem}: rerun with {self.fix}" if self.fix else problem
        self.warning = message
        if self.mode == "stop":
            raise RunCollapsed(f"collapse guard: {message}",
                               "the model was not saved; --guard warn trains on and saves it anyway")
        _note(f"warning: collapse guard: {message}")

    def watch(self, loss_fn):
        """loss_fn, feeding the guard the metrics of each micro-batch."""
        if self.mode == "off":
            return loss_fn

        def guarded(model, batch):
            loss, metrics = loss_fn(model, batch)
            self.observe(metrics)
            return loss, metrics

        return guarded

    def summary(self) -> dict:
        """What the artifact's metrics record: the warning, when one was given."""
        return {"guard_warning": self.warning} if self.warning else {}


def _note(message: str) -> None:
    from prefcli import distributed as dist

    if dist.is_main():
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True).print(Text(message, style="yellow"), soft_wrap=True)


def _mean_over_ranks(metrics: dict, keys: tuple[str, ...]) -> dict:
    """The watched metrics averaged over the processes of a torchrun (over those that have each):
    every rank's guard then sees the same numbers and stops, or warns, at the same step."""
    from prefcli import distributed as dist

    if dist.world_size() == 1:
        return metrics
    import torch

    local = []
    for key in keys:  # a fixed layout: ranks may differ in which keys they have (kto)
        value = metrics.get(key)
        local += [0.0, 0.0] if value is None else [float(value), 1.0]
    total = dist.all_reduce_mean(torch.tensor(local, dtype=torch.float64)).tolist()
    return {key: total[2 * i] / total[2 * i + 1] for i, key in enumerate(keys) if total[2 * i + 1] > 0}
