"""What `prefcli eval` measures, on loaded models and plain data (quickstart uses it too).

- perplexity: next-token loss, perplexity and bits per byte on held-out text;
- reward_accuracy: a reward model's pairwise accuracy and reward distributions;
- compare: sample replies from policies and a reference; win rates (gold judge and/or
  judge reward models), gold good-rates, KL(policy || reference), length and diversity,
  each rate with n and a 95% interval (`prefcli.metrics`).

The model work (sampling, teacher-forced log-probs, reward scores) is `prefcli.inference`.
"""

from __future__ import annotations

import math

import torch

from prefcli.artifacts import Loaded
from prefcli.data import demo, sources
from prefcli.data.examples import Pair, prompt_text
from prefcli.errors import PrefcliError
from prefcli.inference import device_of, reward_scores, sample_replies, teacher_forced_logprobs
from prefcli.metrics import distinct_n, distribution, mean_summary, per_prompt, rate_summary, win_scores
from prefcli.model import Transformer
from prefcli.progress import progress
from prefcli.tokenizer import Tokenizer, same_tokenizer


# ---------------------------------------------------------------- perplexity
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
    device = device_of(model)
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


# ---------------------------------------------------------------- comparing
def compare(models: dict[str, Loaded], reference: Loaded | None = None, prompts: list[list[dict]] | None = None, *,
            reference_name: str = "reference", judge_model=None, gold: bool | None = None,
            samples: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            max_tokens: int = 64, seed: int = 0, batch_size: int = 64, kl: bool = True,
            limit: int | None = None, offsets: dict[str, torch.Tensor] | None = None, judge_fn=None) -> dict:
    """Sample replies from each model (and the reference) and measure them side by side.

    models: {name: Loaded} (only .model and .tokenizer are used). prompts: lists of chat
    messages; None = the demo eval prompts, judged by the gold judge (gold=None means
    "only for the demo prompts"). For each model: gold good-rate and per-attribute rates,
    mean reward (judge_model: a reward model's Loaded, or `prefcli.rewards.Rewards`, a
    weighted sum of reward models), mean length, distinct-1/2; against the reference: win
    rate by the gold judge's overall score and per attribute, win rate by judge_model reward
    (ties count half), and KL(model || reference) estimated on the model's samples as the
    mean over samples of sum_t [log p(y_t) - log r(y_t)] (kl=True needs one tokenizer).
    offsets: {model name: steering vector's embedding offset} for steered models (`prefcli.steer`).
    judge_fn: the user's judge (`rewards.Rewards` from --judge-fn MODULE:FUNCTION[=WEIGHT]): its
    score per reply, good-rate (share of replies scoring above 0) and win rate, as the gold judge's.
    Returns the result dict documented in README (eval compare).
    """
    if prompts is None:
        prompts = sources.demo_prompts("eval")
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
            for s, r in zip(g, _judge(judge_model, flat_prompts, [s["text"] for s in g], batch_size)):
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


def _judge(judge_model, prompts: list[list[dict]], replies: list[str], batch_size: int) -> list[float]:
    """Rewards of replies by one reward model (Loaded) or a weighted sum of reward sources (Rewards)."""
    if isinstance(judge_model, Loaded):
        items = [(p, [{"role": "assistant", "content": r}]) for p, r in zip(prompts, replies)]
        return reward_scores(judge_model.model, judge_model.tokenizer, items, batch_size)[0]
    return judge_model(prompts, replies)[0]


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
