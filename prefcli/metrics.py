"""Statistics of evaluation results: rates with 95% intervals, distributions, diversity.

Confidence intervals (95%): a rate of 0/1 outcomes gets the Wilson score interval; a
mean of per-prompt scores that are not all 0 or 1 (win rates with ties counted half,
several samples per prompt) gets the normal approximation mean +- 1.96 s / sqrt(n)
over prompts (clipped to [0, 1] for rates). Prompts are the unit: the samples of one
prompt are not independent.
"""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054  # two-sided 95% normal quantile
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate (Wilson 1927); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # min/max: rounding must not push the interval past the observed rate (at p = 0 or 1).
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float | None, float | None]:
    """Normal approximation mean +- z * s / sqrt(n) (s with n - 1); (None, None) below 2 values."""
    n = len(values)
    if n < 2:
        return None, None
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean - z * s / math.sqrt(n), mean + z * s / math.sqrt(n)


def rate_summary(values: list[float]) -> dict:
    """A rate from per-prompt scores in [0, 1]: {rate, n, ci, ci_method}.

    All scores 0 or 1: Wilson. Otherwise (ties counted half, means over several samples):
    normal approximation over prompts, clipped to [0, 1].
    """
    n = len(values)
    rate = sum(values) / n if n else None
    if all(v in (0.0, 1.0) for v in values):
        lo, hi = wilson_interval(sum(values), n)
        method = "wilson"
    else:
        lo, hi = mean_interval(values)
        lo, hi = (0.0, 1.0) if lo is None else (max(0.0, lo), min(1.0, hi))
        method = "normal"
    return {"rate": rate, "n": n, "ci": [lo, hi], "ci_method": method}


def mean_summary(values: list[float]) -> dict:
    """{mean, n, std, ci} with the normal-approximation interval of the mean."""
    n = len(values)
    if not n:
        return {"mean": None, "n": 0, "std": None, "ci": [None, None]}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "n": n, "std": std, "ci": list(mean_interval(values))}


def distribution(values: list[float]) -> dict:
    """{n, mean, std (population), min, q05, q25, median, q75, q95, max} (linear-interpolated quantiles)."""
    if not values:
        return {"n": 0}
    t = torch.tensor(values, dtype=torch.float64)
    qs = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    names = ("q05", "q25", "median", "q75", "q95")
    return {"n": len(values), "mean": float(t.mean()), "std": float(t.std(unbiased=False)),
            "min": float(t.min()), **dict(zip(names, qs)), "max": float(t.max())}


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams, over all texts.

    Words are whitespace-separated, so the figure does not depend on the tokenizer;
    n-grams never span two texts. 0.0 when there is no n-gram at all.
    """
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_scores(policy: list[float], reference: list[float]) -> list[float]:
    """1 where the policy scores higher, 0.5 for a tie, 0 where it scores lower."""
    return [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference)]


def per_prompt(values: list[float], samples: int) -> list[float]:
    """Means of consecutive groups of `samples` values (the samples of one prompt)."""
    return [sum(values[i:i + samples]) / samples for i in range(0, len(values), samples)]
