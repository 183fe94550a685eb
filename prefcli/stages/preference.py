"""`prefcli align --method dpo|ipo|hinge|robust|simpo|orpo|kto`: offline preference optimisation.

Recipe: read pairs (or build them from the policy's own samples, ranked by a judge),
compute the reference log-probs once (no gradients; kept with the run so a resume
does not recompute them; the reference is then freed), train the policy on the
method's loss with chosen and rejected in one forward pass, save models/<method>.

(Over 400 lines: seven losses share the data, reference pass, on-policy pairs and rounds here.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from prefcli import distributed as dist
from prefcli import lora
from prefcli.config import to_dict
from prefcli.artifacts import (AdapterOptions, TrainingOptions, join_processes, load_model_artifact, lr_option, note, prepare_for_training,
                               prepare_run, save_model_artifact, train_config)
from prefcli.data import sources
from prefcli.config import option
from prefcli.data.demo.lineage import require_prompts_unless_demo
from prefcli.data.examples import Encoded, Pair, encode_completion, pair_from_row, prompt_from_row
from prefcli.data.readers import read_rows
from prefcli.errors import PrefcliError
from prefcli.inference import length_groups, pair_logprobs, pair_sequence_logps, sample_ids
from prefcli.model import Transformer
from prefcli.objectives.preference import METHODS, chosen_nll_loss, kto_loss, preference_loss
from prefcli.rewards import build_rewards
from prefcli.tokenizer import Tokenizer, same_tokenizer
from prefcli.trainer import Trainer, training_autocast
from prefcli.workspace import Workspace


def _method_defaults(option_name: str) -> str:
    """--help's default of a loss option: each method's that takes it."""
    return ", ".join(f"{m} {spec.defaults[option_name]}" for m, spec in METHODS.items() if option_name in spec.defaults)


STAGE_LR = 5e-4  # measured on the demo with --rpo-alpha 1: win rate over sft 0.66 at 1e-4/120 steps, 0.77 at 5e-4/300


@dataclass
class PreferenceConfig(TrainingOptions, AdapterOptions):
    method: str = "dpo"
    data: list[str] = option(factory=list, default_text="the method's built-in demo data",  # empty: the demo pairs
                             help="Training data files, folders or globs; repeatable.")
    policy: str = option("sft", "Model to start from.")
    reference: str | None = option(None, "Reference model.", default_text="the policy's starting weights")
    out: str | None = option(None, "Name of the model to write.", default_text="the method's name")
    beta: float | None = option(None, "The method's beta.", gt=0, default_text=_method_defaults("beta"))  # None: the method's default
    label_smoothing: float | None = option(None, "dpo (conservative DPO) and robust: assumed share of flipped labels.",
                                           ge=0, lt=0.5, default_text=_method_defaults("label_smoothing"))
    simpo_gamma: float | None = option(None, "simpo: target reward margin gamma.", ge=0,
                                       default_text=_method_defaults("simpo_gamma"))
    desirable_weight: float | None = option(None, "kto: weight of desirable replies.", gt=0,
                                            default_text=_method_defaults("desirable_weight"))
    undesirable_weight: float | None = option(None, "kto: weight of undesirable replies.", gt=0,
                                              default_text=_method_defaults("undesirable_weight"))
    # NLL of the chosen reply added to the pair loss; None: 1 (0 for orpo, which has its own).
    # Without it DPO at this lr collapses on custom pairs (chosen log-probs fall, replies degenerate);
    # the demo's measured figures were all made with 1 (examples/custom_task/README.md).
    rpo_alpha: float | None = option(None, "Add A x NLL of the chosen reply to the pair loss (RPO); keeps DPO from collapsing.",
                                     ge=0, default_text="1 (orpo 0)")
    guard: str = option("stop", "On a collapse (the chosen log-prob falling): stop (exit 1, nothing saved), warn, or off.",
                        choices=("stop", "warn", "off"))
    # On-policy pairs: N samples per prompt, best vs worst by a judge; repeated for `rounds`.
    pairs_from_policy: int = option(0, "Build pairs from N policy samples per prompt: best vs worst by --judge-model / --reward-fn; 0: off.",
                                    ge=0)
    rounds: int = option(1, "With --pairs-from-policy: repeat sample, rank, train K times (iterative DPO).", ge=1)
    prompts: list[str] = option(factory=list, default_text="the built-in RL prompts",  # default: the built-in RL prompts
                                help="Prompt rows (prompt or messages) to sample from; repeatable.")
    num_prompts: int | None = option(None, "Use only the first N prompts.", ge=1, default_text="all")
    judge_model: list[str] = option(factory=list, default_text="none",
                                    help="Reward model ranking the samples (NAME or NAME=WEIGHT; repeatable).")
    reward_fn: list[str] = option(factory=list, default_text="none",
                                  help="Reward function: demo (the gold judge) or MODULE:FUNCTION, optionally =WEIGHT; repeatable.")
    temperature: float = option(1.0, "Sampling temperature for on-policy samples.", ge=0)
    max_tokens: int = option(64, "Longest sampled reply in tokens.", ge=1)
    val_fraction: float = option(0.05, "Share of the data held out for validation.", ge=0, lt=1)
    max_length: int | None = option(None, "Tokens per prompt + reply; longer rows are cut (and counted).", ge=2,
                                    default_text="the model's context", panel="LoRA and memory")
    max_prompt_length: int | None = option(None, "Prompt tokens kept (its last ones).", ge=1, default_text="no limit",
                                           panel="LoRA and memory")
    lr: float | None = lr_option(STAGE_LR)
    eval_every: int = 0

    def resolved(self) -> "PreferenceConfig":
        """A copy with the method's defaults filled in (beta, rpo_alpha); what the stage records and trains with."""
        spec = METHODS.get(self.method)
        beta = self.beta if self.beta is not None or spec is None else spec.defaults["beta"]
        rpo_alpha = self.rpo_alpha if self.rpo_alpha is not None else DEFAULT_RPO_ALPHA.get(self.method, 1.0)
        return dataclasses.replace(self, beta=beta, rpo_alpha=rpo_alpha)


DEFAULT_RPO_ALPHA = {"orpo": 0.0}  # every other method: 1.0
DEFAULT_STEPS = 300  # without data to count (not used when there is)
DEFAULT_EPOCHS = 4.8  # 300 steps over the 2,000 demo pairs at batch 32
_OPTION_NAMES = ("label_smoothing", "simpo_gamma", "desirable_weight", "undesirable_weight")


def method_options(cfg: PreferenceConfig) -> dict:
    """The loss options the user set, checked against what the method takes."""
    spec = METHODS[cfg.method]
    given = {k: getattr(cfg, k) for k in _OPTION_NAMES if getattr(cfg, k) is not None}
    for k in given:
        if k not in spec.defaults:
            raise PrefcliError(f"--{k.replace('_', '-')}: does not apply to --method {cfg.method}",
                               f"{cfg.method} takes: {', '.join('--' + o.replace('_', '-') for o in spec.defaults)}")
    return given


# ---------------------------------------------------------------- data
@dataclass
class Item:
    """One training example: a pair (chosen, rejected), or for KTO one reply with its label."""

    chosen: Encoded
    rejected: Encoded | None = None
    desirable: bool = True
    kl: Encoded | None = None  # KTO: this prompt with another example's reply


def read_items(cfg: PreferenceConfig, tok: Tokenizer, context: int) -> tuple[list[Item], list[dict]]:
    paired = METHODS[cfg.method].paired
    if sources.use_demo(cfg.data):
        pairs, inputs = sources.pairs(cfg.data, "train")
        return items_from_pairs(pairs, tok, context, paired, cfg.max_prompt_length), inputs
    rows = read_rows(cfg.data, option="--data")
    inputs = sources.file_inputs(cfg.data)
    if all("chosen" in r and "rejected" in r for r in rows):
        return items_from_pairs([pair_from_row(r) for r in rows], tok, context, paired, cfg.max_prompt_length), inputs
    if paired:
        bad = next(r for r in rows if "chosen" not in r or "rejected" not in r)
        raise PrefcliError(f"{bad['_source']}: --method {cfg.method} needs 'chosen' and 'rejected'",
                           "use pairs, or --method kto for prompt/completion/label rows")
    items = []
    for r in rows:
        if "completion" not in r or not isinstance(r.get("label"), bool):
            raise PrefcliError(f"{r['_source']}: KTO rows need 'prompt', 'completion' and a true/false 'label'", "fix the row")
        prompt = prompt_from_row(r)
        reply = [{"role": "assistant", "content": r["completion"]}] if isinstance(r["completion"], str) else r["completion"]
        items.append(Item(encode_completion(tok, prompt, reply, context, cfg.max_prompt_length), desirable=r["label"]))
    _add_kl_examples(items, tok, (context, cfg.max_prompt_length), [prompt_from_row(r) for r in rows],
                     [[{"role": "assistant", "content": r["completion"]}] if isinstance(r["completion"], str) else r["completion"] for r in rows])
    return items, inputs


def items_from_pairs(pairs: list[Pair], tok: Tokenizer, context: int, paired: bool,
                     max_prompt_len: int | None = None) -> list[Item]:
    if paired:
        return [Item(encode_completion(tok, p.prompt, p.chosen, context, max_prompt_len),
                     encode_completion(tok, p.prompt, p.rejected, context, max_prompt_len)) for p in pairs]
    # KTO on paired data: each pair gives one desirable and one undesirable reply.
    items, prompts, replies = [], [], []
    for p in pairs:
        for reply, good in ((p.chosen, True), (p.rejected, False)):
            items.append(Item(encode_completion(tok, p.prompt, reply, context, max_prompt_len), desirable=good))
            prompts.append(p.prompt)
            replies.append(reply)
    _add_kl_examples(items, tok, (context, max_prompt_len), prompts, replies)
    return items


def _add_kl_examples(items: list[Item], tok: Tokenizer, limits: tuple[int, int | None], prompts, replies) -> None:
    """KTO's KL estimate uses mismatched examples: prompt i with the reply of example i+1.

    limits: (max length, max prompt length) of encode_completion."""
    n = len(items)
    for i, item in enumerate(items):
        item.kl = encode_completion(tok, prompts[i], replies[(i + 1) % n], *limits)


# ---------------------------------------------------------------- log-probs
def _pairs(items: list[Item]) -> list[tuple[Encoded, Encoded]]:
    """The two sequences the loss needs of each item: chosen, and rejected (or KTO's kl row).

    Both are replies to the item's prompt (kl: this prompt with another example's reply), so
    the prompt can run once for both (inference.pair_logprobs)."""
    return [(it.chosen, it.rejected if it.rejected is not None else it.kl) for it in items]


def _encodings(items: list[Item]) -> list[Encoded]:
    """Every sequence the loss needs, in a fixed order: chosen, rejected (or kl) per item."""
    return [e for pair in _pairs(items) for e in pair]


def used_items(num_items: int, max_steps: int, batch_size: int, grad_accum: int, seed: int) -> list[int]:
    """The item indices this rank's training run will draw (a 4-step run needs no more than 4 batches)."""
    from prefcli.distributed import batch_indices

    return sorted({i for step in range(max_steps) for micro in range(grad_accum)
                   for i in batch_indices(step, micro, batch_size, grad_accum, num_items, seed=seed)})


def reference_logps(model: Transformer, items: list[Item], pad_id: int, batch_size: int, device, cache: Path,
                    used: list[int] | None = None) -> torch.Tensor:
    """Reference log-probs [2N] (chosen, rejected/kl per item), cached in the run folder.

    used: only these items are scored (the others stay NaN): what the run will train on.
    """
    if used is not None and len(used) < len(items):
        part = reference_logps(model, [items[i] for i in used], pad_id, batch_size, device, cache)
        full = torch.full((2 * len(items),), float("nan"))
        idx = torch.tensor(used)
        full[2 * idx], full[2 * idx + 1] = part[0::2], part[1::2]
        return full
    encs = _encodings(items)
    h = hashlib.sha256()
    for e in encs:
        h.update(json.dumps([e.ids, e.mask]).encode())
    h.update(b"bf16" if torch.is_autocast_enabled(torch.device(device).type) else b"")  # the format they were computed in
    fingerprint = h.hexdigest()
    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                return f.get_tensor("logps")
    logps, _ = pair_sequence_logps(model, _pairs(items), batch_size, desc="reference log-probs")
    if dist.is_main():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        save_file({"logps": logps.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
        tmp.replace(cache)
    return logps


# ---------------------------------------------------------------- on-policy pairs
def policy_pairs(model: Transformer, tok: Tokenizer, prompts: list[list[dict]], n: int, rewards, cfg: PreferenceConfig,
                 device, seed: int) -> tuple[list[Pair], dict]:
    """N samples per prompt from the policy; the best and worst (by the judge) become a pair."""
    pairs, gaps, skipped = [], [], 0
    model.eval()
    chunk = max(1, 64 // n)
    gen = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, len(prompts), chunk):
        group = prompts[i : i + chunk]
        ids = [tok.chat_ids(p, add_generation_prompt=True) for p in group]
        replies = [s["text"] for s in sample_ids(model, tok, ids, samples=n, temperature=cfg.temperature,
                                                  max_tokens=cfg.max_tokens, seed=gen, batch_size=chunk * n)]
        scores, _ = rewards([p for p in group for _ in range(n)], replies)
        for j, prompt in enumerate(group):
            s = scores[j * n : (j + 1) * n]
            r = replies[j * n : (j + 1) * n]
            best, worst = max(range(n), key=s.__getitem__), min(range(n), key=s.__getitem__)
            if s[best] == s[worst]:
                skipped += 1  # no preference signal in this group
                continue
            pairs.append(Pair(prompt, [{"role": "assistant", "content": r[best]}], [{"role": "assistant", "content": r[worst]}]))
            gaps.append(s[best] - s[worst])
    stats = {"pairs": len(pairs), "prompts_without_signal": skipped,
             "mean_score_gap": round(sum(gaps) / max(1, len(gaps)), 4)}
    return pairs, stats


# ---------------------------------------------------------------- training
def _heldout_items(cfg: PreferenceConfig, tok: Tokenizer, context: int, val: list[Item]) -> list[Item]:
    """Pairs to report accuracy on: the demo's held-out pairs when training on demo data, else the val split."""
    heldout = sources.heldout_pairs(cfg.data)
    if heldout is not None:
        return items_from_pairs(heldout, tok, context, True)
    return [it for it in val if it.rejected is not None]


def pair_accuracy(model: Transformer, ref_model: Transformer | None, items: list[Item], pad: int, batch: int, device,
                  needs_reference: bool, ref_logps: torch.Tensor | None = None) -> float:
    """Share of pairs whose implicit reward prefers chosen: log-ratios (or avg log-probs without a reference)."""
    if not items:
        return float("nan")
    pairs = _pairs(items)
    lp, n = pair_sequence_logps(model, pairs, batch, desc="held-out accuracy")
    if needs_reference and ref_logps is None and lora.has_adapters(model) and ref_model is None:
        with lora.adapters_disabled(model):  # LoRA: the starting model is the base with adapters off
            ref_logps = pair_sequence_logps(model, pairs, batch, desc="held-out reference")[0]
    if needs_reference:
        ref = ref_logps if ref_logps is not None else pair_sequence_logps(ref_model, pairs, batch, desc="held-out reference")[0]
        margin = (lp[0::2] - ref[0::2]) - (lp[1::2] - ref[1::2])
    else:
        avg = lp / n.clamp(min=1)
        margin = avg[0::2] - avg[1::2]
    return round(float((margin > 0).float().mean()), 4)


def run(cfg: PreferenceConfig, ws: Workspace) -> dict:
    t0 = time.time()
    if cfg.method not in METHODS:
        raise PrefcliError(f"--method {cfg.method}: unknown preference method", f"choose one of {', '.join(METHODS)}")
    spec = METHODS[cfg.method]
    cfg = cfg.resolved()
    opts = method_options(cfg)
    beta = cfg.beta
    if cfg.rounds < 1 or cfg.pairs_from_policy < 0:
        raise PrefcliError("--rounds must be at least 1 and --pairs-from-policy at least 0")
    if cfg.rounds > 1 and not cfg.pairs_from_policy:
        raise PrefcliError("--rounds needs --pairs-from-policy N", "iterative DPO samples new pairs each round")
    if cfg.pairs_from_policy == 1:
        raise PrefcliError("--pairs-from-policy 1: a pair needs at least 2 samples per prompt", "use 4 or more")
    policy = load_model_artifact(ws, cfg.policy, "--policy", kind="causal_lm")
    model, tok = prepare_for_training(policy.model, cfg), policy.tokenizer
    if not tok.has_chat_template:
        raise PrefcliError(f"--policy: {policy.path} has no chat template", "align an SFT model (prefcli align --method sft)")
    context = min(model.config.max_position_embeddings, cfg.max_length or model.config.max_position_embeddings)
    parents = [policy.parent()]
    rewards = None
    if cfg.pairs_from_policy:
        rewards = build_rewards(ws, cfg.judge_model, cfg.reward_fn, "cpu", model_option="--judge-model")
        parents += rewards.parents
        if not cfg.prompts:  # the demo's RL prompts suit only models made from the demo data
            require_prompts_unless_demo({cfg.policy: policy.path})
        prompts, _ = sources.prompts(cfg.prompts, "rl", cfg.num_prompts or None)
        inputs = [{"kind": "input", "name": "on-policy pairs"}]
    else:
        items, inputs = read_items(cfg, tok, context)
    parents += inputs
    ref_model = None
    if cfg.reference:
        if not spec.needs_reference:
            raise PrefcliError(f"--reference: --method {cfg.method} uses no reference model", "leave --reference out")
        ref_loaded = load_model_artifact(ws, cfg.reference, "--reference", kind="causal_lm")
        if not same_tokenizer(ref_loaded.tokenizer, tok):
            raise PrefcliError(f"--reference: {ref_loaded.path} uses a different tokenizer from the policy", "pick a reference made from the same base")
        ref_model = ref_loaded.model
        parents.append(ref_loaded.parent())
    out = cfg.out or cfg.method
    ws.check_writable("models", out, cfg.overwrite or cfg.resume)
    root_run = prepare_run(ws, out, resume=cfg.resume, overwrite=cfg.overwrite, config=to_dict(cfg)) if cfg.rounds == 1 else _prepare_rounds(ws, out, cfg)
    summary, round_stats = {}, []
    trainer = None
    for rnd in range(1, cfg.rounds + 1):
        run_dir = root_run if cfg.rounds == 1 else root_run / f"round-{rnd}"
        device = trainer.device if trainer else _device(cfg)
        if cfg.pairs_from_policy:
            pairs, stats = _round_pairs(run_dir, model.to(device), tok, prompts, rewards, cfg, device, rnd)
            round_stats.append({"round": rnd, **stats})
            if not pairs:
                raise PrefcliError("--pairs-from-policy: every prompt's samples scored the same; no pair to learn from",
                                   "sample more replies per prompt, raise --temperature, or use another judge")
            items = items_from_pairs(pairs, tok, context, spec.paired, cfg.max_prompt_length)
        truncated = sum(it.chosen.truncated or bool(it.rejected and it.rejected.truncated) for it in items)
        if truncated:
            note(f"warning: {truncated} of {len(items)} examples were truncated to {context} tokens"
                 + (f" (prompts to {cfg.max_prompt_length})" if cfg.max_prompt_length else ""))
        # The demo pairs have their own held-out split (reported below); other data gives up a share.
        on_demo = sources.use_demo(cfg.data) and not cfg.pairs_from_policy
        train, val = sources.split_val(items, 0.0 if on_demo else cfg.val_fraction, cfg.seed)
        ref_logps = None
        tcfg = train_config(cfg, len(train), DEFAULT_STEPS, DEFAULT_EPOCHS, stage_lr=STAGE_LR, model=model)
        if spec.needs_reference:
            ref = (ref_model or model).to(device)
            used = used_items(len(train), tcfg.max_steps, cfg.batch_size, cfg.grad_accum, cfg.seed)
            # In the training's number format: under bf16 autocast an fp32 reference would differ from
            # the policy at step 0 by bf16's rounding (0.06 nats a SmolLM2 pair, measured), not zero.
            with lora.adapters_disabled(ref), training_autocast(tcfg.precision, torch.device(device)):
                ref_logps = reference_logps(ref, train, tok.pad_id, cfg.batch_size, device,
                                            run_dir / "reference_logps.safetensors", used)
        if ref_model is not None:
            ref_model.cpu()  # off the device while the policy trains
        guard = preference_guard(cfg, tcfg.lr)
        trainer = Trainer(model, guard.watch(_loss_fn(cfg, spec, beta, opts, train, ref_logps, tok.pad_id, lambda: trainer.device)),
                          _batches(cfg, train), tcfg, run_dir, desc=f"{cfg.method} {out}" + (f" round {rnd}" if cfg.rounds > 1 else ""))
        resume_round = cfg.resume and bool(_checkpoints(run_dir))
        summary = trainer.train(resume=resume_round)
        model = trainer.full_model()  # a plain module (under FSDP gathered from the shards) for what follows
    device = trainer.device
    heldout = _heldout_items(cfg, tok, context, val)
    start = None
    if heldout and spec.needs_reference and not lora.has_adapters(model):  # implicit rewards: log-ratios against the start
        start = (ref_model or load_model_artifact(ws, cfg.policy, "--policy", kind="causal_lm").model).to(device)
    acc = pair_accuracy(model, start, heldout, tok.pad_id, cfg.batch_size, device, spec.needs_reference)
    del start
    metrics = {
        "train_loss": round(summary.get("train_loss", float("nan")), 4),
        "heldout_accuracy": acc,
        "heldout_pairs": len(heldout),
        "pairs": len(train),
        "truncated": truncated,
        "steps": summary.get("steps"),
        "lr": float(f"{tcfg.lr:.3g}"),  # the peak rate trained with (`default_lr` when --lr was not given)
        **{k: round(v, 4) for k, v in summary.items() if k.startswith(("rewards/", "logps/"))},
        **guard.summary(),
    }
    config = to_dict(cfg) | {"beta": beta, **opts}
    save_model_artifact(ws, out, model.float().cpu(), policy.path, kind="causal_lm", stage=f"align {cfg.method}",
                        config=config, parents=parents, metrics=metrics, overwrite=cfg.overwrite or cfg.resume, chat=True,
                        extra_meta={"rounds": round_stats} if round_stats else None)
    dist.barrier()
    result = {"model": out, "method": cfg.method, **metrics, "seconds": round(time.time() - t0, 1)}
    if round_stats:
        result["rounds"] = round_stats
    return result


def preference_guard(cfg: PreferenceConfig, lr: float):
    from prefcli.guard import CollapseGuard

    fix = "--rpo-alpha 1 or a lower --lr" if not cfg.rpo_alpha else f"a lower --lr (now {lr:g}) or a higher --rpo-alpha"
    return CollapseGuard(cfg.guard, "preference", fix)


def _device(cfg: PreferenceConfig):
    from prefcli.trainer import resolve_device

    return resolve_device(cfg.device)


def _checkpoints(run_dir: Path) -> list:
    from prefcli.trainer import list_checkpoints

    return list_checkpoints(run_dir)


def _prepare_rounds(ws: Workspace, out: str, cfg: PreferenceConfig) -> Path:
    run_dir = ws.folder("runs") / out
    if cfg.resume:
        join_processes(cfg.device)
        if not run_dir.exists():
            raise PrefcliError(f"--resume: {run_dir} has no checkpoint to resume from", "run without --resume to start a new run")
        return run_dir
    return prepare_run(ws, out, resume=False, overwrite=cfg.overwrite, config=to_dict(cfg))


def _round_pairs(run_dir: Path, model, tok, prompts, rewards, cfg, device, rnd) -> tuple[list[Pair], dict]:
    """This round's on-policy pairs, saved as JSONL in the run folder (a resumed round reuses them)."""
    path = run_dir / "pairs.jsonl"
    if cfg.resume and path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        stats = json.loads((run_dir / "pairs_stats.json").read_text())
        return [pair_from_row(r) for r in rows], stats
    pairs, stats = policy_pairs(model, tok, prompts, cfg.pairs_from_policy, rewards, cfg, device, cfg.seed + rnd)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs))
        (run_dir / "pairs_stats.json").write_text(json.dumps(stats))
    return pairs, stats


def _batches(cfg: PreferenceConfig, train: list[Item]):
    from prefcli.distributed import batch_indices

    def batches(step: int, micro: int) -> list[int]:
        return batch_indices(step, micro, cfg.batch_size, cfg.grad_accum, len(train), seed=cfg.seed)

    return batches


def _loss_fn(cfg: PreferenceConfig, spec, beta: float, opts: dict, train: list[Item], ref_logps, pad: int, device_of,
             shared: bool | None = None):
    """The method's loss on a micro-batch of item indices: one forward pass over chosen + rejected.

    shared: run each prompt once for both replies (True), twice (False), or once for the
    pairs where that is faster (None; inference.worth_sharing)."""

    def loss_fn(model, idx: list[int]):
        device = device_of()
        items = [train[i] for i in idx]
        pairs = _pairs(items)
        (pc, p2), (len_c, len_2) = pair_logprobs(model, pairs, pad, device, length_groups(), shared)
        if ref_logps is not None:
            ref = ref_logps.to(device)
            sel = torch.tensor(idx, device=device)
            rc, r2 = ref[2 * sel], ref[2 * sel + 1]
        else:
            rc = r2 = None
        if spec.paired:
            loss, metrics = preference_loss(cfg.method, pc, p2, rc, r2, chosen_lengths=len_c, rejected_lengths=len_2,
                                            beta=beta, rpo_alpha=cfg.rpo_alpha, **opts)
        else:
            good = torch.tensor([it.desirable for it in items], device=device)
            kw = {k2: v for k2, v in {**spec.defaults, **opts}.items() if k2 != "beta"}
            loss, metrics = kto_loss(pc[good], pc[~good], rc[good], rc[~good], p2.detach(), r2, beta=beta, **kw)
            if cfg.rpo_alpha and bool(good.any()):
                nll = chosen_nll_loss(pc[good], len_c[good])
                loss = loss + cfg.rpo_alpha * nll
                metrics["nll_loss"] = nll.detach()
        # The tokens of the sequences trained on, whether or not their prompts ran once.
        return loss, {**metrics, "tokens": sum(len(a.ids) + len(b.ids) for a, b in pairs)}

    return loss_fn
