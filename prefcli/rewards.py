"""Where rewards come from: reward-model artifacts, Python functions, the demo's gold judge.

A source scores replies to prompts: `source(prompts, replies) -> list[float]`, where a
prompt is its list of chat messages and a reply is text. Several sources are summed
with weights. Specs:

    --reward-model rm            a reward model artifact (or HF folder)
    --reward-model rm=0.5        the same, weighted
    --reward-fn demo             the demo's gold judge (overall score in [0, 1])
    --reward-fn pkg.mod:func=2   a Python function func(prompts: list[str], replies: list[str]) -> list[float]

A user function is imported from the user's own code, which the user names on
the command line; prefcli never evaluates strings from config values.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefcli.data.examples import prompt_text
from prefcli.errors import PrefcliError, RuntimeFailure
from prefcli.workspace import Workspace


def split_weight(spec: str, option: str) -> tuple[str, float]:
    name, sep, weight = spec.rpartition("=")
    if not sep:
        return spec, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise PrefcliError(f"{option} {spec}: weight '{weight}' is not a number", f"write {option} NAME=WEIGHT, e.g. {name}=0.5")


@dataclass
class Source:
    name: str
    weight: float
    fn: Callable[[list[list[dict]], list[str]], list[float]]
    parent: dict | None = None


def demo_judge_source() -> Callable:
    from prefcli.data import demo

    def score(prompts: list[list[dict]], replies: list[str]) -> list[float]:
        return [float(demo.judge(prompt_text(p), r)["overall"]) for p, r in zip(prompts, replies)]

    return score


def python_source(spec: str, option: str = "--reward-fn") -> Callable:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise PrefcliError(f"{option} {spec}: expected MODULE:FUNCTION", "e.g. --reward-fn my_rewards:exact_match, or demo")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the user's own module next to where they run prefcli
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PrefcliError(f"{option} {spec}: cannot import {module_name} ({e})", "run prefcli from the folder that holds the module, or install it")
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise PrefcliError(f"{option} {spec}: {module_name} has no function {func_name}", "check the name")

    def score(prompts: list[list[dict]], replies: list[str]) -> list[float]:
        try:
            out = fn([prompt_text(p) for p in prompts], list(replies))
        except Exception as e:  # the user's code failed while training or scoring ran: a runtime failure
            raise RuntimeFailure(f"{option} {spec}: the function raised {type(e).__name__}: {str(e).strip()[:200]}",
                                 "fix the function; a training run continues from its last checkpoint with --resume") from None
        try:
            values = [float(x) for x in out]
        except (TypeError, ValueError):
            raise PrefcliError(f"{option} {spec}: the function must return a list of numbers", "return one float per reply")
        if len(values) != len(replies):
            raise PrefcliError(f"{option} {spec}: returned {len(values)} scores for {len(replies)} replies", "return one float per reply")
        return values

    return score


def check_scores(values, source: str, prompts: list[list[dict]], replies: list[str]) -> list[float]:
    """One finite number per reply, or an error naming the source and the offending row."""
    values = list(values)
    if len(values) != len(replies):
        raise PrefcliError(f"reward {source}: returned {len(values)} scores for {len(replies)} replies", "return one float per reply")
    for i, v in enumerate(values):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            prompt = prompt_text(prompts[i])[:60] if i < len(prompts) else ""
            raise PrefcliError(
                f"reward {source}: score {v!r} for row {i} of the batch (prompt {prompt!r}, reply {replies[i][:60]!r}) is not a finite number",
                "return one finite float per reply",
            )
    return [float(v) for v in values]


class Rewards:
    """A weighted sum of sources; also reports each source's own mean for logging."""

    def __init__(self, sources: list[Source]):
        if not sources:
            raise PrefcliError("no reward given", "pass --reward-model NAME and/or --reward-fn demo|MODULE:FUNCTION")
        self.sources = sources

    def __call__(self, prompts: list[list[dict]], replies: list[str]) -> tuple[list[float], dict[str, float]]:
        total = [0.0] * len(replies)
        parts = {}
        for s in self.sources:
            values = check_scores(s.fn(prompts, replies), s.name, prompts, replies)
            parts[s.name] = sum(values) / max(1, len(values))
            total = [t + s.weight * v for t, v in zip(total, values)]
        return total, parts

    @property
    def parents(self) -> list[dict]:
        return [s.parent for s in self.sources if s.parent]


def build_rewards(ws: Workspace, reward_models: list[str] = (), reward_fns: list[str] = (), device="cpu",
                  model_option: str = "--reward-model", fn_option: str = "--reward-fn") -> Rewards:
    sources = []
    for spec in reward_models:
        name, weight = split_weight(spec, model_option)
        from prefcli.inference import RewardScorer

        scorer = RewardScorer(ws, name, model_option, device)
        sources.append(Source(f"rm:{name}", weight, lambda p, r, s=scorer: s(p, r), scorer.parent))
    for spec in reward_fns:
        name, weight = split_weight(spec, fn_option)
        fn = demo_judge_source() if name == "demo" else python_source(name, fn_option)
        sources.append(Source(name, weight, fn, {"kind": "reward_fn", "name": name}))
    return Rewards(sources)
