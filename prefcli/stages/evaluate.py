"""`prefcli eval`: measure models.

- perplexity: next-token loss, perplexity and bits per byte on held-out text.
- reward: a reward model's pairwise accuracy and reward distributions on held-out pairs.
- compare: sample replies from policies and a reference on held-out prompts; win rates
  (gold judge and/or a judge reward model), gold good-rates, KL(policy || reference),
  length and diversity, each rate with n and a 95% interval.

The measuring functions (`perplexity`, `reward_accuracy`, `compare`, and the statistics
below) take loaded models and plain data, so other stages (quickstart) use them without
the CLI. `run_perplexity`, `run_reward` and `run_compare` are the CLI's recipes: resolve
the artifacts, measure, write evals/<name>.json (`write_eval`).

Confidence intervals (95%): a rate of 0/1 outcomes gets the Wilson score interval; a
mean of per-prompt scores that are not all 0 or 1 (win rates with ties counted half,
several samples per prompt) gets the normal approximation mean +- 1.96 s / sqrt(n)
over prompts (clipped to [0, 1] for rates). Prompts are the unit: the samples of one
prompt are not independent.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefcli import __version__
from prefcli.config import to_dict
from prefcli.data import demo
from prefcli.data.examples import Pair, encode_completion, pair_from_row, prompt_from_row, prompt_text
from prefcli.data.readers import SUPPORTED, expand_inputs, iter_documents, read_rows
from prefcli.data.tokens import TokenArray
from prefcli.errors import PrefcliError
from prefcli.generate import generate
from prefcli.model import Transformer
from prefcli.objectives.lm import token_logprobs
from prefcli.progress import progress
from prefcli.rewards import build_rewards
from prefcli.stages.common import Loaded, load_model_artifact
from prefcli.tokenizer import Tokenizer
from prefcli.trainer import resolve_device
from prefcli.workspace import NAME_RE, Workspace, parent_ref

Z95 = 1.959963984540054  # two-sided 95% normal quantile
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
LOGIT_BUDGET = 1 << 25  # float32 logits held at once by a teacher-forced pass (~128 MB)


# ============================================================== statistics
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


# ============================================================== perplexity
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model: Transformer, tokenizer: Tokenizer, ids: torch.Tensor, *, batch_size: int = 16,
               max_windows: int | None = None, context: int | None = None) -> dict:
    """Next-token loss of `ids` (1-D) in windows of the model's context.

    Window k holds ids[kC : kC + C + 1] (C = context), so consecutive windows share one
    token and every token after the first is predicted exactly once, from 0 to C - 1
    tokens of context. loss = total nats / predicted tokens; perplexity = exp(loss);
    bits per byte = total nats / ln 2 / UTF-8 bytes of the predicted tokens' decoded text
    (special tokens such as <|eos|> decode to no bytes but their nats count).
    """
    C = context or model.config.max_position_embeddings
    ids = ids.to(torch.long).flatten()
    n_windows = max(0, math.ceil((len(ids) - 1) / C))
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise PrefcliError("the text is too short to measure: it needs at least two tokens", "pass more text")
    end = min(len(ids), n_windows * C + 1)
    device = _device(model)
    total = torch.zeros((), dtype=torch.float64)
    with progress(n_windows, "eval perplexity", unit="window") as bar:
        for first in range(0, n_windows, batch_size):
            starts = list(range(first * C, min(first + batch_size, n_windows) * C, C))
            rows = torch.full((len(starts), C + 1), 0, dtype=torch.long)
            targets = torch.full((len(starts), C), -100, dtype=torch.long)
            for r, s in enumerate(starts):
                w = ids[s:min(s + C + 1, end)]
                rows[r, :len(w)] = w
                targets[r, :len(w) - 1] = w[1:]
            logits = model(rows[:, :-1].to(device))
            nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten().to(device),
                                                     ignore_index=-100, reduction="sum")
            total += nats.double().cpu()
            bar.update(len(starts))
    tokens = end - 1
    nbytes = len(tokenizer.decode(ids[1:end].tolist(), skip_special_tokens=True).encode("utf-8"))
    loss = float(total) / tokens
    return {"tokens": tokens, "windows": n_windows, "context": C, "bytes": nbytes, "nats": float(total),
            "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": float(total) / math.log(2) / nbytes if nbytes else None}


def encode_documents(tokenizer: Tokenizer, documents) -> torch.Tensor:
    """Documents encoded with the tokenizer, each followed by its end-of-document token (as tokenize does)."""
    out: list[int] = []
    eos = tokenizer.eos_id
    chunk: list[str] = []

    def flush():
        for ids in tokenizer.encode_batch(chunk):
            out.extend(ids + ([eos] if eos is not None else []))
        chunk.clear()

    for doc in documents:
        chunk.append(doc)
        if len(chunk) >= 256:
            flush()
    flush()
    return torch.tensor(out, dtype=torch.long)


# ============================================================== reward models
@torch.inference_mode()
def reward_scores(rm: Transformer, tokenizer: Tokenizer, items: list[tuple[list[dict], list[dict]]],
                  batch_size: int = 64) -> tuple[list[float], int]:
    """Reward of each (prompt messages, reply messages): the chat rendering of prompt + reply
    (encode_completion, cut to the model's context), scored at its last token.

    Identical token sequences are scored once, so equal texts get exactly equal rewards.
    Returns (rewards, how many were truncated).
    """
    max_len = rm.config.max_position_embeddings
    encoded = [encode_completion(tokenizer, p, r, max_len) for p, r in items]
    truncated = sum(e.truncated for e in encoded)
    unique = sorted({tuple(e.ids) for e in encoded}, key=len)
    device = _device(rm)
    score: dict[tuple, float] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        T = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), T), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = 1
        values = rm.sequence_scores(ids.to(device), attention_mask=mask.to(device)).float().cpu().tolist()
        score.update(zip(chunk, values))
    return [score[tuple(e.ids)] for e in encoded], truncated


def _gold_fails(pair: Pair) -> dict[str, bool]:
    """Per attribute: does the gold judge pass the chosen reply and fail the rejected one."""
    text = prompt_text(pair.prompt)
    c = demo.judge(text, "".join(m["content"] for m in pair.chosen))
    r = demo.judge(text, "".join(m["content"] for m in pair.rejected))
    return {a: c[a] > r[a] for a in demo.ATTRIBUTES}


def reward_accuracy(rm: Loaded, pairs: list[Pair], *, batch_size: int = 64, gold: bool = False) -> dict:
    """Pairwise accuracy of a reward model: share of pairs with r(chosen) > r(rejected), ties half.

    Also the margin r(chosen) - r(rejected) and the distributions of both rewards.
    gold=True (demo pairs): accuracy by prompt category, and by the attribute the gold
    judge says the rejected reply fails (a pair counts under each attribute it fails).
    """
    chosen, t1 = reward_scores(rm.model, rm.tokenizer, [(p.prompt, p.chosen) for p in pairs], batch_size)
    rejected, t2 = reward_scores(rm.model, rm.tokenizer, [(p.prompt, p.rejected) for p in pairs], batch_size)
    wins = win_scores(chosen, rejected)
    margins = [c - r for c, r in zip(chosen, rejected)]
    out = {
        "pairs": len(pairs),
        "accuracy": rate_summary(wins),
        "ties": sum(w == 0.5 for w in wins),
        "margin": distribution(margins),
        "chosen": distribution(chosen),
        "rejected": distribution(rejected),
        "truncated": t1 + t2,
    }
    if gold:
        cats: dict[str, list[float]] = {}
        flaws: dict[str, list[float]] = {a: [] for a in demo.ATTRIBUTES}
        for p, w in zip(pairs, wins):
            cats.setdefault(demo.prompt_category(prompt_text(p.prompt)) or "other", []).append(w)
            for a, fails in _gold_fails(p).items():
                if fails:
                    flaws[a].append(w)
        out["by_category"] = {c: rate_summary(v) for c, v in cats.items()}
        out["by_rejected_flaw"] = {a: rate_summary(v) for a, v in flaws.items() if v}
    out["rewards"] = {"chosen": chosen, "rejected": rejected}
    return out


# ============================================================== sampling and comparing
def sample_replies(lm: Loaded, prompts: list[list[dict]], *, samples: int = 1, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, max_tokens: int = 64, seed: int = 0,
                   batch_size: int = 64, bar=None, embed_offset: torch.Tensor | None = None) -> list[dict]:
    """`samples` replies per prompt, flat (prompt i's sample j at i * samples + j).

    Each: prompt_ids, tokens (the stop token included when hit), logprobs (raw, from
    generate), finished, length (tokens without the stop token), text. Every model draws
    from its own generator seeded with `seed` (common random numbers: two copies of one
    model sample the very same replies). embed_offset: a steering vector (`prefcli.steer`).
    """
    tok, model = lm.tokenizer, lm.model
    prompt_ids = [tok.chat_ids(m, add_generation_prompt=True) for m in prompts]
    order = [i for i in range(len(prompts)) for _ in range(samples)]
    gen = torch.Generator(device=_device(model)).manual_seed(seed)
    stop = tok.stop_ids(chat=True)
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


@torch.inference_mode()
def teacher_forced_logprobs(model: Transformer, sequences: list[list[int]], starts: list[int],
                            batch_size: int = 64) -> list[list[float]]:
    """log p(seq[t] | seq[:t]) under `model` for t >= start, each sequence fed whole (right-padded)."""
    out: list[list[float]] = [[] for _ in sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    device = _device(model)
    V = model.config.vocab_size
    i = 0
    while i < len(order):
        T = len(sequences[order[min(i + batch_size, len(order)) - 1]])
        n = max(1, min(batch_size, LOGIT_BUDGET // max(1, T * V)))
        chunk = order[i:i + n]
        T = max(len(sequences[j]) for j in chunk)
        ids = torch.zeros((len(chunk), T), dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, j in enumerate(chunk):
            ids[r, :len(sequences[j])] = torch.tensor(sequences[j])
            mask[r, :len(sequences[j])] = 1
        ids = ids.to(device)
        logits = model(ids, attention_mask=None if bool(mask.all()) else mask.to(device))
        logp = token_logprobs(logits[:, :-1], ids[:, 1:]).cpu()  # logp[:, t - 1] is for token t
        for r, j in enumerate(chunk):
            out[j] = logp[r, starts[j] - 1:len(sequences[j]) - 1].tolist()
        i += n
    return out


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """The same ids for the same text (tokenizer.encoding_identity), whatever wrote the files."""
    from prefcli.tokenizer import same_tokenizer as same

    return same(a, b)


def demo_prompts(limit: int | None = None) -> list[list[dict]]:
    """The 300 held-out demo prompts as chat messages (any prefix is balanced over categories)."""
    rows = demo.eval_prompts()
    return [[{"role": "user", "content": r["prompt"]}] for r in rows[:limit]]


def compare(models: dict[str, Loaded], reference: Loaded | None = None, prompts: list[list[dict]] | None = None, *,
            reference_name: str = "reference", judge_model: Loaded | None = None, gold: bool | None = None,
            samples: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            max_tokens: int = 64, seed: int = 0, batch_size: int = 64, kl: bool = True,
            limit: int | None = None, offsets: dict[str, torch.Tensor] | None = None, judge_fn=None) -> dict:
    """Sample replies from each model (and the reference) and measure them side by side.

    models: {name: Loaded} (only .model and .tokenizer are used). prompts: lists of chat
    messages; None = the demo eval prompts, judged by the gold judge (gold=None means
    "only for the demo prompts"). For each model: gold good-rate and per-attribute rates,
    mean reward (judge_model), mean length, distinct-1/2; against the reference: win rate
    by the gold judge's overall score and per attribute, win rate by judge_model reward
    (ties count half), and KL(model || reference) estimated on the model's samples as the
    mean over samples of sum_t [log p(y_t) - log r(y_t)] (kl=True needs one tokenizer).
    offsets: {model name: steering vector's embedding offset} for steered models (`prefcli.steer`).
    judge_fn: the user's judge (`rewards.Rewards` from --judge-fn MODULE:FUNCTION[=WEIGHT]): its
    score per reply, good-rate (share of replies scoring above 0) and win rate, as the gold judge's.
    Returns the result dict documented in README (eval compare).
    """
    if prompts is None:
        prompts = demo_prompts()
        gold = True if gold is None else gold
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise PrefcliError("eval compare: there are no prompts to compare on", "pass --prompts FILE with at least one row")
    if samples < 1 or max_tokens < 1 or batch_size < 1:
        raise PrefcliError("eval compare: --samples, --max-tokens and --batch-size must be at least 1")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise PrefcliError("eval compare: --temperature and --top-k must be >= 0 and --top-p in (0, 1]")
    texts = [prompt_text(m) for m in prompts]
    categories = [demo.prompt_category(t) for t in texts]
    if gold:
        unknown = next((t for t, c in zip(texts, categories) if c is None), None)
        if unknown is not None:
            raise PrefcliError(f"--gold: the gold judge does not know the prompt {unknown!r}",
                               "the gold judge only rates the demo (Millbrook) prompts; leave out --gold")
    if reference is not None and kl:
        for name, lm in models.items():
            if not same_tokenizer(lm.tokenizer, reference.tokenizer):
                raise PrefcliError(
                    f"--reference: {reference_name} uses a different tokenizer from --model {name}; "
                    "KL(model || reference) needs the same tokenizer",
                    "compare models made with one tokenizer, or pass --no-kl",
                )

    runs = list(models.items()) + ([(reference_name, reference)] if reference is not None else [])
    per_model = math.ceil(len(prompts) * samples / batch_size)
    sampling = dict(samples=samples, temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens,
                    seed=seed, batch_size=batch_size)
    # A model passed twice (as a policy and as the reference) is sampled once: with one seed
    # per model its replies would be the same anyway.
    distinct = {id(lm): lm for _, lm in runs}
    offset_of = {id(lm): (offsets or {}).get(name) for name, lm in runs}  # a steered model is its own Loaded
    with progress(per_model * len(distinct), "eval compare", unit="batch") as bar:
        drawn = {key: sample_replies(lm, prompts, bar=bar, embed_offset=offset_of[key], **sampling)
                 for key, lm in distinct.items()}
    gens = [[dict(s) for s in drawn[id(lm)]] for _, lm in runs]

    flat_prompts = [m for m in prompts for _ in range(samples)]
    flat_texts = [t for t in texts for _ in range(samples)]
    for g in gens:
        if gold:
            for s, t in zip(g, flat_texts):
                s["gold"] = demo.judge(t, s["text"])
        if judge_fn is not None:
            for s, score in zip(g, judge_fn(flat_prompts, [s["text"] for s in g])[0]):
                s["judge"] = score
        if judge_model is not None:
            rewards, _ = reward_scores(judge_model.model, judge_model.tokenizer,
                                       [(p, [{"role": "assistant", "content": s["text"]}]) for p, s in zip(flat_prompts, g)],
                                       batch_size)
            for s, r in zip(g, rewards):
                s["reward"] = r
    if reference is not None and kl:
        for g in gens[:len(models)]:
            seqs = [s["prompt_ids"] + s["tokens"] for s in g]
            starts = [len(s["prompt_ids"]) for s in g]
            ref_lp = teacher_forced_logprobs(reference.model, seqs, starts, batch_size)
            for s, r in zip(g, ref_lp):
                s["kl"] = sum(s["logprobs"]) - sum(r)

    stats = {name: _model_stats(g, samples, categories, gold) for (name, _), g in zip(runs, gens)}
    if reference is not None:
        ref_g = gens[-1]
        for (name, _), g in zip(runs[:len(models)], gens):
            stats_vs = stats[name]["vs_reference"] = {}
            if gold:
                stats_vs["win_rate_gold"] = rate_summary(per_prompt(win_scores(
                    [s["gold"]["overall"] for s in g], [s["gold"]["overall"] for s in ref_g]), samples))
                stats_vs["win_rate_gold_by_attribute"] = {a: rate_summary(per_prompt(win_scores(
                    [s["gold"][a] for s in g], [s["gold"][a] for s in ref_g]), samples)) for a in demo.ATTRIBUTES}
            if judge_fn is not None:
                stats_vs["win_rate_judge"] = rate_summary(per_prompt(win_scores(
                    [s["judge"] for s in g], [s["judge"] for s in ref_g]), samples))
            if judge_model is not None:
                stats_vs["win_rate_reward"] = rate_summary(per_prompt(win_scores(
                    [s["reward"] for s in g], [s["reward"] for s in ref_g]), samples))
            if kl:
                values = [s["kl"] for s in g]
                stats_vs["kl"] = mean_summary(per_prompt(values, samples))
                stats_vs["kl_per_token"] = sum(values) / max(1, sum(len(s["tokens"]) for s in g))

    def reply(s: dict) -> dict:
        keep = {"text": s["text"], "tokens": s["length"], "finished": s["finished"]}
        keep.update({k: s[k] for k in ("gold", "judge", "reward", "kl") if k in s})
        return keep

    sample_rows = []
    for i, (msgs, text, cat) in enumerate(zip(prompts, texts, categories)):
        sl = slice(i * samples, (i + 1) * samples)
        row = {"prompt": text}
        if len(msgs) > 1:
            row["messages"] = msgs
        if cat is not None:
            row["category"] = cat
        row["replies"] = {name: [reply(s) for s in g[sl]] for (name, _), g in zip(runs[:len(models)], gens)}
        if reference is not None:
            row["reference"] = [reply(s) for s in gens[-1][sl]]
        sample_rows.append(row)

    ceiling = None
    if reference is not None and gold:
        # A perfect policy ties wherever the reference is already good: win rate <= 1 - good_rate / 2.
        ceiling = 1 - stats[reference_name]["gold"]["good"]["rate"] / 2
    return {
        "prompts": len(prompts),
        "samples_per_prompt": samples,
        "sampling": {k: v for k, v in sampling.items() if k != "samples"},
        "gold_judge": bool(gold),
        "judge_model": judge_model is not None,
        "judge_fn": [src.name for src in judge_fn.sources] if judge_fn is not None else None,
        "reference": reference_name if reference is not None else None,
        "models": {name: stats[name] for name in models},
        "reference_stats": stats[reference_name] if reference is not None else None,
        "win_rate_gold_ceiling": ceiling,
        "samples": sample_rows,
    }


def _model_stats(g: list[dict], samples: int, categories: list, gold: bool) -> dict:
    out = {
        "replies": len(g),
        "mean_length": sum(s["length"] for s in g) / len(g),
        "finished_rate": sum(s["finished"] for s in g) / len(g),
        "distinct_1": distinct_n([s["text"] for s in g], 1),
        "distinct_2": distinct_n([s["text"] for s in g], 2),
    }
    if gold:
        out["gold"] = {"good": rate_summary(per_prompt([float(s["gold"]["good"]) for s in g], samples)),
                       **{a: rate_summary(per_prompt([s["gold"][a] for s in g], samples)) for a in demo.ATTRIBUTES},
                       "overall": sum(s["gold"]["overall"] for s in g) / len(g)}
        by_cat: dict[str, list[float]] = {}
        for i, cat in enumerate(categories):
            by_cat.setdefault(cat, []).extend(float(s["gold"]["good"]) for s in g[i * samples:(i + 1) * samples])
        out["gold_good_by_category"] = {c: rate_summary(per_prompt(v, samples)) for c, v in by_cat.items()}
    if "judge" in g[0]:  # the user's judge: good = a score above 0
        out["judge"] = {"good": rate_summary(per_prompt([float(s["judge"] > 0) for s in g], samples)),
                        "score": mean_summary(per_prompt([s["judge"] for s in g], samples))}
    if "reward" in g[0]:
        out["reward"] = mean_summary(per_prompt([s["reward"] for s in g], samples))
    return out


# ============================================================== the CLI's recipes
@dataclass
class PerplexityConfig:
    model: str = "base"
    data: list[str] = field(default_factory=list)  # empty: dataset corpus
    split: str = "val"
    text_field: str = "text"
    limit: int | None = None  # windows
    batch_size: int = 16
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    plot: bool = False


@dataclass
class RewardEvalConfig:
    model: str = "rm"
    pairs: list[str] = field(default_factory=list)  # empty: the demo held-out pairs
    gold: bool = False
    limit: int | None = None
    batch_size: int = 64
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    plot: bool = False


@dataclass
class CompareConfig:
    model: list[str] = field(default_factory=list)
    reference: str | None = None  # None: sft when it exists
    judge_model: str | None = None
    judge_fn: list[str] = field(default_factory=list)  # MODULE:FUNCTION[=WEIGHT], as --reward-fn; summed
    prompts: list[str] = field(default_factory=list)  # empty: the demo eval prompts
    gold: bool = False
    limit: int | None = None
    samples: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0
    batch_size: int = 64
    kl: bool = True
    prefer: list[str] = field(default_factory=list)  # steering settings, each a column per steered model
    device: str = "auto"
    out: str | None = None
    overwrite: bool = False
    plot: bool = False


def slug(text: str) -> str:
    """A valid artifact-name piece from a model name or path."""
    s = re.sub(r"[^a-z0-9._-]+", "-", Path(str(text).rstrip("/")).name.lower()).strip("-.")
    return s or "model"


def display_name(lm: Loaded) -> str:
    return lm.meta.get("name") or Path(lm.path).name


def write_eval(ws: Workspace, name: str, command: str, config: dict, parents: list[dict], metrics: dict,
               result: dict, overwrite: bool = False) -> dict:
    """Write evals/<name>.json: {"meta": {...}, **result}; returns the document.

    meta: kind "eval", name, prefcli_version, created, stage ("eval <command>"), config,
    parents (models and data used), metrics (headline numbers, shown by `prefcli ls`).
    """
    meta = {"kind": "eval", "name": name, "prefcli_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "stage": f"eval {command}", "config": config, "parents": parents, "metrics": metrics}
    doc = {"meta": meta, **result}
    ws.write_json("evals", name, doc, overwrite=overwrite)
    return doc


def _plots(ws: Workspace, name: str, doc: dict) -> list[str]:
    from prefcli import plots

    return [str(p) for p in plots.plot_eval(ws, name, doc)]


def _prepare(ws: Workspace, cfg, default_name: str) -> str:
    """Fail before any work: the eval's name is valid and free, and --plot can draw."""
    name = cfg.out or default_name
    ws.check_writable("evals", name, cfg.overwrite)
    if cfg.plot:
        from prefcli import plots

        plots.require_matplotlib()
    return name


def _finish(ws: Workspace, cfg, name: str, command: str, parents: list[dict], metrics: dict, result: dict) -> dict:
    doc = {"meta": {"name": name, "stage": f"eval {command}", "parents": parents}, **result}
    plot_paths = _plots(ws, name, doc) if cfg.plot else []
    if plot_paths:
        result["plots"] = plot_paths
    return write_eval(ws, name, command, to_dict(cfg), parents, metrics, result, cfg.overwrite)


def _is_dataset_ref(ws: Workspace, ref: str) -> bool:
    p = Path(ref).expanduser()
    if p.is_dir() and (p / "train.safetensors").is_file():
        return True
    if p.exists() or any(c in ref for c in "*?[") or "/" in ref or p.suffix in SUPPORTED:
        return False
    return bool(NAME_RE.match(ref))


def _check_positive(cfg, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v < 1:
            raise PrefcliError(f"--{n.replace('_', '-')} {v}: must be at least 1")


def run_perplexity(cfg: PerplexityConfig, ws: Workspace) -> dict:
    t0 = time.time()
    _check_positive(cfg, "limit", "batch_size")
    if cfg.split not in ("val", "train"):
        raise PrefcliError(f"--split {cfg.split}: must be val or train")
    device = resolve_device(cfg.device)
    name = _prepare(ws, cfg, f"perplexity-{slug(cfg.model)}")
    lm = load_model_artifact(ws, cfg.model, "--model", kind="causal_lm", device=device)
    lm.model.eval()
    parents = [lm.parent()]
    data = list(cfg.data) or ["corpus"]
    if len(data) == 1 and _is_dataset_ref(ws, data[0]):
        from prefcli.stages.common import load_token_dataset

        ds_path, _, tok_path = load_token_dataset(ws, data[0])
        if not same_tokenizer(Tokenizer(tok_path), lm.tokenizer):
            raise PrefcliError(
                f"--data: dataset {ds_path.name} was encoded with tokenizer {tok_path.name}, not the tokenizer of --model {cfg.model}",
                "pass text files instead (they are encoded with the model's tokenizer)",
            )
        split = ds_path / f"{cfg.split}.safetensors"
        arr = TokenArray(split)
        ids = arr[0:len(arr)]
        source = f"dataset {ds_path.name} ({cfg.split})"
        parents.append(parent_ref("datasets", ds_path))
    else:
        files = expand_inputs(data, "--data")
        ids = encode_documents(lm.tokenizer, iter_documents(files, cfg.text_field))
        source = ", ".join(str(f) for f in files)
        parents += [{"kind": "files", "name": f.name, "path": str(f.resolve())} for f in files]
    if len(ids) < 2:
        raise PrefcliError(f"--data: {source} holds fewer than two tokens", "pass more text")
    res = perplexity(lm.model, lm.tokenizer, ids, batch_size=cfg.batch_size, max_windows=cfg.limit)
    result = {"model": display_name(lm), "data": source, **res, "seconds": round(time.time() - t0, 2)}
    metrics = {k: res[k] for k in ("loss", "perplexity", "bits_per_byte")}
    return _finish(ws, cfg, name, "perplexity", parents, metrics, result)


def run_reward(cfg: RewardEvalConfig, ws: Workspace) -> dict:
    t0 = time.time()
    _check_positive(cfg, "limit", "batch_size")
    device = resolve_device(cfg.device)
    name = _prepare(ws, cfg, f"reward-{slug(cfg.model)}")
    rm = load_model_artifact(ws, cfg.model, "--model", kind="reward", device=device)
    rm.model.eval()
    if cfg.pairs:
        rows = read_rows(cfg.pairs, option="--pairs")
        pairs = [pair_from_row(r) for r in rows]
        source = ", ".join(cfg.pairs)
        gold = cfg.gold
        data_parents = [{"kind": "files", "name": Path(p).name, "path": str(Path(p).resolve())} for p in cfg.pairs]
    else:
        pairs = [pair_from_row(r) for r in demo.preference_pairs("heldout")]
        source, gold = "demo preference pairs (heldout)", True
        data_parents = [{"kind": "demo", "name": "preference_pairs/heldout"}]
    pairs = pairs[:cfg.limit] if cfg.limit else pairs
    if gold:
        unknown = next((p for p in pairs if demo.prompt_category(prompt_text(p.prompt)) is None), None)
        if unknown is not None:
            raise PrefcliError(f"--gold: the gold judge does not know the prompt of {unknown.source}",
                               "the gold judge only rates the demo (Millbrook) prompts; leave out --gold")
    res = reward_accuracy(rm, pairs, batch_size=cfg.batch_size, gold=gold)
    result = {"model": display_name(rm), "data": source, **res, "seconds": round(time.time() - t0, 2)}
    metrics = {"accuracy": res["accuracy"]["rate"], "margin": res["margin"]["mean"]}
    return _finish(ws, cfg, name, "reward", [rm.parent(), *data_parents], metrics, result)


def run_compare(cfg: CompareConfig, ws: Workspace) -> dict:
    t0 = time.time()
    _check_positive(cfg, "limit", "batch_size", "samples", "max_tokens")
    if not cfg.model:
        raise PrefcliError("eval compare: no --model given", "pass --model NAME (repeat it to compare several)")
    device = resolve_device(cfg.device)
    name = _prepare(ws, cfg, "compare-" + "-".join(slug(m) for m in cfg.model))
    models: dict[str, Loaded] = {}
    for ref in cfg.model:
        lm = load_model_artifact(ws, ref, "--model", kind="causal_lm", device=device)
        key, k = display_name(lm), 2
        while key in models:
            key, k = f"{display_name(lm)}-{k}", k + 1
        lm.model.eval()
        models[key] = lm
    ref_name = cfg.reference
    if ref_name is None and ws.exists("models", "sft"):
        ref_name = "sft"
    reference = None
    if ref_name:
        ref_path = ws.resolve("models", ref_name, "--reference").resolve()
        same = [lm for lm in models.values() if Path(lm.path).resolve() == ref_path]
        reference = same[0] if same else load_model_artifact(ws, ref_name, "--reference", kind="causal_lm", device=device)
    parents = [lm.parent() for lm in models.values()]
    offsets = None
    if cfg.prefer:
        from prefcli.steer import steered_models

        models, offsets = steered_models(models, cfg.prefer)
    judge = load_model_artifact(ws, cfg.judge_model, "--judge-model", kind="reward", device=device) if cfg.judge_model else None
    judge_fn = build_rewards(ws, (), cfg.judge_fn, device, fn_option="--judge-fn") if cfg.judge_fn else None
    for x in (reference, judge):
        if x is not None:
            x.model.eval()
    if cfg.prompts:
        prompts = [prompt_from_row(r) for r in read_rows(cfg.prompts, option="--prompts")]
        data_parents = [{"kind": "files", "name": Path(p).name, "path": str(Path(p).resolve())} for p in cfg.prompts]
        gold = cfg.gold
    else:
        demo.require_prompts_unless_demo({p["name"]: p["path"] for p in parents})  # demo prompts: demo models only
        prompts, gold = None, True
        data_parents = [{"kind": "demo", "name": "eval_prompts"}]
    res = compare(models, reference, prompts, reference_name=display_name(reference) if reference else "reference",
                  judge_model=judge, gold=gold, samples=cfg.samples, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                  kl=cfg.kl, limit=cfg.limit, offsets=offsets, judge_fn=judge_fn)
    parents += [x.parent() for x in (reference, judge) if x is not None] + (judge_fn.parents if judge_fn else []) + data_parents
    metrics = {}
    for m, st in res["models"].items():
        vs = st.get("vs_reference", {})
        for key, value in (("win_rate", vs.get("win_rate_gold") or vs.get("win_rate_judge") or vs.get("win_rate_reward")),
                           ("good_rate", st.get("gold", {}).get("good") or st.get("judge", {}).get("good")),
                           ("kl", vs.get("kl"))):
            if value:
                metrics[f"{m}/{key}"] = value.get("rate", value.get("mean"))
    result = {**res, "seconds": round(time.time() - t0, 2)}
    return _finish(ws, cfg, name, "compare", parents, metrics, result)


# ============================================================== tables
def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _rate(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return "-"
    lo, hi = r["ci"]
    return f"{r['rate']:.3f} [{lo:.2f}, {hi:.2f}]"


def _mean(r: dict | None, digits: int = 3) -> str:
    if not r or r.get("mean") is None:
        return "-"
    lo, hi = r["ci"]
    return f"{r['mean']:.{digits}f}" + (f" [{lo:.{digits - 1}f}, {hi:.{digits - 1}f}]" if lo is not None else "")


def perplexity_table(doc: dict):
    from rich.table import Table

    t = Table(title=f"eval perplexity -> evals/{doc['meta']['name']}.json", show_header=False, title_justify="left")
    for k in ("model", "data", "tokens", "windows", "loss", "perplexity", "bits_per_byte", "seconds"):
        v = doc.get(k)
        t.add_row(k.replace("_", " "), f"{v:,}" if isinstance(v, int) else _fmt(v, 4))
    return t


def reward_table(doc: dict):
    from rich.table import Table

    t = Table(title=f"eval reward -> evals/{doc['meta']['name']}.json", show_header=False, title_justify="left")
    t.add_row("model", doc["model"])
    t.add_row("pairs", f"{doc['pairs']:,} ({doc['data']})")
    t.add_row("accuracy (ties half)", _rate(doc["accuracy"]) + (f", {doc['ties']} ties" if doc["ties"] else ""))
    for k in ("margin", "chosen", "rejected"):
        d = doc[k]
        t.add_row(f"{k} reward" if k != "margin" else "margin", f"mean {d['mean']:.3f}  std {d['std']:.3f}  "
                  f"q05 {d['q05']:.3f}  median {d['median']:.3f}  q95 {d['q95']:.3f}")
    for c, r in doc.get("by_category", {}).items():
        t.add_row(f"  accuracy on {c}", _rate(r))
    for a, r in doc.get("by_rejected_flaw", {}).items():
        t.add_row(f"  rejected not {a}", _rate(r) + f" (n={r['n']})")
    if doc["truncated"]:
        t.add_row("truncated to context", str(doc["truncated"]))
    return t


def compare_table(doc: dict):
    """Models side by side (the reference last): one row per measure, 95% intervals in brackets."""
    from rich.table import Table

    cols = list(doc["models"].items())
    if doc.get("reference_stats"):
        cols.append((f"{doc['reference']} (reference)", doc["reference_stats"]))
    s = doc["sampling"]
    title = (f"eval compare -> evals/{doc['meta']['name']}.json: {doc['prompts']} prompts x {doc['samples_per_prompt']} "
             f"sample(s), temperature {s['temperature']}, up to {s['max_tokens']} tokens")
    caption = "95% intervals: Wilson for 0/1 rates; normal approximation over prompts for win rates (ties count half)."
    if doc.get("win_rate_gold_ceiling") is not None:
        caption += (f" Against this reference a perfect policy's gold win rate is at most "
                    f"{doc['win_rate_gold_ceiling']:.3f} (ties where the reference is already good).")
    if doc["reference"] and (s["temperature"] != 1.0 or s["top_k"] or s["top_p"] < 1.0):
        caption += " KL uses the raw log-probs, so it is KL(model || reference) only at temperature 1 without top-k/top-p."
    t = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    t.add_column("")
    for name, _ in cols:
        t.add_column(name)

    def row(label, get):
        t.add_row(label, *[get(st) for _, st in cols])

    vs = lambda st: st.get("vs_reference") or {}  # noqa: E731
    if doc.get("judge_fn"):
        row("judge good rate (score > 0)", lambda st: _rate(st["judge"]["good"]))
        row("mean judge score", lambda st: _mean(st["judge"]["score"]))
    if doc["gold_judge"]:
        row("gold good rate", lambda st: _rate(st["gold"]["good"]))
        for a in demo.ATTRIBUTES:
            row(f"  {a}", lambda st, a=a: _rate(st["gold"][a]))
    if doc["reference"]:
        if doc["gold_judge"]:
            row(f"win rate vs {doc['reference']} (gold)", lambda st: _rate(vs(st).get("win_rate_gold")))
            for a in demo.ATTRIBUTES:
                row(f"  {a}", lambda st, a=a: _rate((vs(st).get("win_rate_gold_by_attribute") or {}).get(a)))
        if doc.get("judge_fn"):
            row(f"win rate vs {doc['reference']} (judge fn)", lambda st: _rate(vs(st).get("win_rate_judge")))
        if doc["judge_model"]:
            row(f"win rate vs {doc['reference']} (judge RM)", lambda st: _rate(vs(st).get("win_rate_reward")))
    if doc["judge_model"]:
        row("mean reward (judge RM)", lambda st: _mean(st.get("reward")))
    if doc["reference"]:
        row(f"KL to {doc['reference']} (nats/reply)", lambda st: _mean(vs(st).get("kl"), 2))
    row("mean length (tokens)", lambda st: f"{st['mean_length']:.1f}")
    row("finished (stop token)", lambda st: f"{st['finished_rate']:.2f}")
    row("distinct-1 / distinct-2", lambda st: f"{st['distinct_1']:.3f} / {st['distinct_2']:.3f}")
    return t
