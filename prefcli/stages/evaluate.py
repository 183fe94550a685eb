"""`prefcli eval`: measure models.

- perplexity: next-token loss, perplexity and bits per byte on held-out text.
- reward: a reward model's pairwise accuracy and reward distributions on held-out pairs.
- compare: sample replies from policies and a reference on held-out prompts; win rates
  (gold judge and/or judge reward models, each optionally =WEIGHT), gold good-rates,
  KL(policy || reference), length and diversity, each rate with n and a 95% interval.

Recipes: resolve the artifacts, measure (`prefcli.measure`: perplexity, reward_accuracy,
compare), write evals/<name>.json (`write_eval`); the tables print the result.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from dataclasses import dataclass
from pathlib import Path

from prefcli import __version__
from prefcli.artifacts import Loaded, load_model_artifact, load_token_dataset
from prefcli.config import option, to_dict
from prefcli.data import demo, sources
from prefcli.data.examples import prompt_text
from prefcli.data.readers import SUPPORTED, expand_inputs, iter_documents
from prefcli.data.tokens import TokenArray
from prefcli.errors import PrefcliError
from prefcli.measure import compare, encode_documents, perplexity, reward_accuracy
from prefcli.rewards import build_rewards
from prefcli.tokenizer import Tokenizer, same_tokenizer
from prefcli.trainer import resolve_device
from prefcli.workspace import NAME_RE, Workspace, parent_ref

# ============================================================== the CLI's recipes
@dataclass
class PerplexityConfig:
    model: str = option("base", "Model to measure.")
    data: list[str] = option(factory=list, default_text="the dataset corpus",  # empty: dataset corpus
                             help="A token dataset, or text files, folders and globs encoded with the model's tokenizer; repeatable.")
    split: str = option("val", "Split of a dataset.", choices=("val", "train"))
    text_field: str = option("text", "Field holding the text in .jsonl/.json/.parquet rows.")
    limit: int | None = option(None, "Measure only the first N windows of the model's context.", ge=1, default_text="all")  # windows
    batch_size: int = option(16, "Windows per forward pass.", ge=1)
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")
    out: str | None = option(None, "Name of the eval, written to evals/<name>.json.", default_text="<subcommand>-<model>")
    overwrite: bool = option(False, "Replace an existing eval of the same name.")
    plot: bool = option(False, "Also draw PNG charts into evals/<name>-*.png (pip install 'prefcli[plot]').")


@dataclass
class RewardEvalConfig:
    model: str = option("rm", "Reward model to measure.")
    pairs: list[str] = option(factory=list, default_text="the held-out demo pairs",  # empty: the demo held-out pairs
                              help="Preference pairs (prompt/chosen/rejected; .jsonl/.json/.parquet); repeatable.")
    gold: bool = option(False, "Break accuracy down with the demo's gold judge (on for the demo pairs).")
    limit: int | None = option(None, "Measure only the first N pairs.", ge=1, default_text="all")
    batch_size: int = option(64, "Replies scored per forward pass.", ge=1)
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")
    out: str | None = option(None, "Name of the eval, written to evals/<name>.json.", default_text="<subcommand>-<model>")
    overwrite: bool = option(False, "Replace an existing eval of the same name.")
    plot: bool = option(False, "Also draw PNG charts into evals/<name>-*.png (pip install 'prefcli[plot]').")


@dataclass
class CompareConfig:
    model: list[str] = option(factory=list, default_text="none", help="Model to compare (repeat for several, side by side).")
    reference: str | None = option(None, "Model to compare against and take KL to.", default_text="sft if it exists")  # None: sft when it exists
    judge_model: list[str] = option(factory=list, default_text="none",  # NAME[=WEIGHT] reward models, summed
                                    help="Reward model that judges win rates and mean reward: NAME or NAME=WEIGHT; repeatable (weighted sum).")
    judge_fn: list[str] = option(factory=list, default_text="none",  # MODULE:FUNCTION[=WEIGHT], as --reward-fn; summed
                                 help="Your judge: MODULE:FUNCTION(prompts, replies) -> scores, optionally =WEIGHT; repeatable (summed). "
                                      "Gives win rates and good-rates (score > 0).")
    prompts: list[str] = option(factory=list, default_text="the 300 held-out demo prompts",  # empty: the demo eval prompts
                                help="Prompt rows (prompt or messages; .jsonl/.json/.parquet); repeatable.")
    gold: bool = option(False, "Judge --prompts with the demo's gold judge (on for the demo prompts).")
    limit: int | None = option(None, "Measure only the first N prompts.", ge=1, default_text="all")
    samples: int = option(1, "Replies sampled per prompt.", ge=1)
    temperature: float = option(1.0, "Sampling temperature (1.0: the policy's own distribution; 0 = greedy).", ge=0)
    top_k: int = option(0, "Top-k sampling; 0: off.", ge=0)
    top_p: float = option(1.0, "Nucleus sampling; 1.0: off.", gt=0, le=1)
    max_tokens: int = option(64, "Most tokens per reply.", ge=1)
    seed: int = option(0, "Random seed.")
    batch_size: int = option(64, "Prompts sampled at once.", ge=1)
    kl: bool = option(True, "Estimate KL(model || reference) (needs one tokenizer).")
    prefer: list[str] = option(factory=list, default_text="none",  # steering settings, each a column per steered model
                               help="Steer the --model(s) made by `align --method steer`: NAME=WEIGHT,...; repeat it to compare several settings side by side.")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")
    out: str | None = option(None, "Name of the eval, written to evals/<name>.json.", default_text="<subcommand>-<model>")
    overwrite: bool = option(False, "Replace an existing eval of the same name.")
    plot: bool = option(False, "Also draw PNG charts into evals/<name>-*.png (pip install 'prefcli[plot]').")


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
        parents += sources.file_parents(files)
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
    pairs, _ = sources.pairs(cfg.pairs, "heldout", option="--pairs")
    if sources.use_demo(cfg.pairs):
        source, gold = "demo preference pairs (heldout)", True
        data_parents = [{"kind": "demo", "name": "preference_pairs/heldout"}]
    else:
        source, gold = ", ".join(cfg.pairs), cfg.gold
        data_parents = sources.file_parents(cfg.pairs)
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
    # --judge-model NAME[=WEIGHT], repeatable (as in align): the weighted sum of their rewards judges.
    # (a str: one --judge-model from a command line that does not repeat the option yet)
    judge_specs = [cfg.judge_model] if isinstance(cfg.judge_model, str) else list(cfg.judge_model or [])
    judge = build_rewards(ws, judge_specs, (), device, model_option="--judge-model") if judge_specs else None
    judge_fn = build_rewards(ws, (), cfg.judge_fn, device, fn_option="--judge-fn") if cfg.judge_fn else None
    if reference is not None:
        reference.model.eval()
    if sources.use_demo(cfg.prompts):
        demo.require_prompts_unless_demo({name: lm.path for name, lm in models.items()})  # demo prompts: demo models only
        prompts, gold = None, True  # compare takes the demo eval prompts and the gold judge
        data_parents = [{"kind": "demo", "name": "eval_prompts"}]
    else:
        prompts, _ = sources.prompts(cfg.prompts, "eval")
        data_parents = sources.file_parents(cfg.prompts)
        gold = cfg.gold
    res = compare(models, reference, prompts, reference_name=display_name(reference) if reference else "reference",
                  judge_model=judge, gold=gold, samples=cfg.samples, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed, batch_size=cfg.batch_size,
                  kl=cfg.kl, limit=cfg.limit, offsets=offsets, judge_fn=judge_fn)
    parents += ([reference.parent()] if reference is not None else []) + (judge.parents if judge else []) \
        + (judge_fn.parents if judge_fn else []) + data_parents
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
