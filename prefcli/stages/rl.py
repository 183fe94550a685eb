"""`prefcli align --method ppo|grpo|rloo`: online reinforcement learning from rewards.

Recipe: load the policy (sft), the reward sources (reward models, Python functions, the
demo's gold judge), a frozen reference (none when the KL coefficient is 0) and, for PPO,
a value model. Then every step: sample replies to this process's prompts with the KV-cache
engine, score them, turn scores into advantages, and take an optimizer step on the
method's loss (all of it in prefcli/objectives/rl.py):

    ppo   per-token reward -kl_coef * KL_t plus the score on the last real token, GAE with
          a value model, clipped policy loss + vf_coef * clipped value loss
          (Ziegler et al. 2019; Ouyang et al. 2022)
    grpo  N samples per prompt, advantage (r - mean_group) / std_group on every token,
          clipped ratio, k3 KL to the reference inside the loss (Shao et al. 2024)
    rloo  N samples per prompt, reward r - kl_coef * KL(reply), REINFORCE with the mean of
          the other N - 1 samples as baseline (Ahmadian et al. 2024)

The value model is a separate model (as InstructGPT and TRL's PPOTrainer), not a second
head on the policy: it starts from the reward model, which already reads replies, and
value-loss gradients never move the policy. It costs a second trained model: weights,
gradients and AdamW state, 16 bytes a parameter in float32 (a 7B policy: +112 GB), which a
shared backbone would save. Trained together, the policy and the value model
sit in one module (`RLModel`: parameters policy.* and value.*) so the Trainer's one
checkpoint holds both; at the end they are saved as models/<out> and models/<out>-value.

The trained module and the rollout engine (sampling, scoring, advantages; exact resume)
are `prefcli.rollouts`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from prefcli import distributed as dist
from prefcli import lora
from prefcli.config import to_dict
from prefcli.artifacts import (AdapterOptions, default_lr, fsdp_option, load_model_artifact, note, prepare_for_training, prepare_run,
                               save_model_artifact)
from prefcli.data import sources
from prefcli.config import option
from prefcli.errors import PrefcliError
from prefcli.data.demo.lineage import require_prompts_unless_demo
from prefcli.guard import CollapseGuard
from prefcli.objectives import rl
from prefcli.objectives.lm import token_logprobs
from prefcli.rewards import build_rewards
from prefcli.rollouts import RLModel, Rollouts
from prefcli.tokenizer import Tokenizer, same_tokenizer
from prefcli.trainer import TrainConfig, Trainer, resolve_device, unwrap
from prefcli.workspace import Workspace

RL_METHODS = ("ppo", "grpo", "rloo")
# What each method gets when an option is not given. Sized for the built-in demo on 2 CPU
# cores (a ~1M-parameter sft model and the default reward model): 300 steps of 128 replies,
# 2.5-4 minutes, each method passing 0.75 gold win over sft. Shorter runs mostly learn politeness
# and concision (30 steps of 64: ~0.63); correctness needs many prompts per step, and ppo a
# strong KL penalty (0.05: KL 10, gold win 0.71; 0.2: KL 3.1-3.3, gold win 0.80-0.82).
# Steps are passes over the prompts (`epochs`): on the 1,000 demo prompts, 300 steps each.
METHOD_DEFAULTS = {
    "ppo": dict(num_generations=1, batch_size=128, kl_coef=0.2, ppo_epochs=2, lr=2e-4, epochs=19.2),
    "grpo": dict(num_generations=8, batch_size=128, kl_coef=0.1, ppo_epochs=1, lr=2e-4, epochs=4.8),
    "rloo": dict(num_generations=8, batch_size=128, kl_coef=0.05, ppo_epochs=1, lr=2e-4, epochs=4.8),
}
PPO_ONLY = ("value_model", "vf_coef", "value_clip", "gamma", "lam", "whiten_rewards")


PPO_DEFAULTS = dict(vf_coef=0.1, value_clip=0.2, gamma=1.0, lam=0.95, whiten_rewards=False)


def _per_method(name: str) -> str:
    """--help's default of an option each method fills in."""
    values = {m: d[name] for m, d in METHOD_DEFAULTS.items() if name in d}
    if len(set(values.values())) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{m} {v}" for m, v in values.items())


_PPO = "ppo: "


@dataclass
class RLConfig(AdapterOptions):
    method: str = "grpo"
    policy: str = option("sft", "Model to start from.")
    reference: str | None = option(None, "Reference model.", default_text="the policy's starting weights")
    out: str | None = option(None, "Name of the model to write.", default_text="the method's name")
    # Rewards (summed with weights); nothing given: the reward model "rm" of the workspace.
    reward_model: list[str] = option(factory=list, default_text="rm when no --reward-fn",
                                     help="Reward model scoring the samples (NAME or NAME=WEIGHT; repeatable).")
    reward_fn: list[str] = option(factory=list, default_text="none",
                                  help="Reward function: demo (the gold judge) or MODULE:FUNCTION, optionally =WEIGHT; repeatable.")
    prompts: list[str] = option(factory=list, default_text="the built-in RL prompts",  # default: the built-in RL prompts
                                help="Prompt rows (prompt or messages) to sample from; repeatable.")
    num_prompts: int | None = option(None, "Use only the first N prompts.", ge=1, default_text="all")
    num_generations: int | None = option(None, "Samples per prompt.", ge=1, default_text=_per_method("num_generations"))  # grpo/rloo groups
    temperature: float = option(1.0, "Sampling temperature for on-policy samples.", ge=0)
    max_tokens: int = option(64, "Longest sampled reply in tokens.", ge=1)
    guard: str = option("stop", "On a collapse (replies shrinking or repeating): stop (exit 1, nothing saved), warn, or off.",
                        choices=("stop", "warn", "off"))
    missing_eos_penalty: float = option(1.0, "Subtracted from the score of a reply cut at --max-tokens.", ge=0)
    kl_coef: float | None = option(None, "KL coefficient to the reference; 0 keeps no reference.", ge=0,
                                   default_text=_per_method("kl_coef"))  # 0: no reference model at all
    kl_target: float | None = option(None, "Adapt the KL coefficient so the KL per reply (nats) approaches this.", gt=0,
                                     default_text="off")  # adaptive coefficient steering the KL per reply (nats) here
    kl_horizon: float = option(10000.0, gt=0)
    clip_range: float = option(0.2, "ppo/grpo: clip the probability ratio to 1 +- this.", gt=0)
    ppo_epochs: int | None = option(None, "ppo/grpo: optimizer steps on each batch of rollouts.", ge=1,
                                    default_text=_per_method("ppo_epochs"))  # optimizer steps per batch of rollouts (grpo: mu)
    loss_norm: str = option("sequence", choices=("sequence", "token", "dr_grpo"))  # grpo: sequence | token | dr_grpo
    scale_rewards: bool = True  # grpo: divide by the group's std
    # PPO only
    value_model: str | None = option(None, _PPO + "where the value model starts.",
                                     default_text="the first --reward-model, else the policy with a fresh head")
    vf_coef: float | None = option(None, _PPO + "weight of the value loss.", ge=0, default_text=str(PPO_DEFAULTS["vf_coef"]))
    value_clip: float | None = option(None, gt=0)
    gamma: float | None = option(None, ge=0, le=1)
    lam: float | None = option(None, ge=0, le=1)
    whiten_rewards: bool | None = option(None, _PPO + "scale per-token rewards by their std before GAE.", default_text="off")
    # Training
    max_steps: int | None = option(None, "Optimizer steps to train (instead of --epochs).", ge=1, default_text="from --epochs")
    epochs: float | None = option(None, "Passes over the prompts (when --max-steps is not given).", gt=0,
                                  default_text=_per_method("epochs") + " (300 steps on the 1,000 demo prompts)")
    batch_size: int | None = option(None, "Replies per micro-batch per process (num-generations per prompt).", ge=1,
                                    default_text=_per_method("batch_size"))
    grad_accum: int = option(1, "Micro-batches per optimizer step.", ge=1)
    lr: float | None = option(None, "Peak learning rate (warmup, then cosine decay).", gt=0,
                              default_text=_per_method("lr") + ", less in full fine-tuning over 2M parameters")
    warmup: int = option(0, "Warmup steps.", ge=0)
    weight_decay: float = option(0.0, ge=0)
    save_every: int = option(20, "Checkpoint every N steps (and at the end); 0: only at the end.", ge=0)
    resume: bool = option(False, "Continue the run runs/<out> from its last checkpoint.")
    compile: bool = option(False, "torch.compile the model.")
    fsdp: bool = fsdp_option()
    seed: int = option(0, "Random seed.")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")
    overwrite: bool = option(False, "Replace an existing artifact of the same name.")

    def resolved(self) -> "RLConfig":
        """A copy with every method default filled in, checked (errors name the option). Nothing given
        as a reward means the workspace's "rm"; steps and checkpoints fall on whole batches of rollouts."""
        cfg = dataclasses.replace(self, reward_model=list(self.reward_model) or ([] if self.reward_fn else ["rm"]))
        if cfg.method not in RL_METHODS:
            raise PrefcliError(f"--method {cfg.method}: not an online RL method", f"choose one of {', '.join(RL_METHODS)}")
        for name, value in METHOD_DEFAULTS[cfg.method].items():
            if name == "lr":  # filled in by `default_lr` once the policy is loaded (it depends on its size)
                continue
            if getattr(cfg, name) is None and not (name == "epochs" and cfg.max_steps is not None):
                setattr(cfg, name, value)
        if cfg.method == "ppo":
            for name, value in PPO_DEFAULTS.items():
                if getattr(cfg, name) is None:
                    setattr(cfg, name, value)
        else:
            given = [n for n in PPO_ONLY if getattr(cfg, n) is not None]
            if given:
                raise PrefcliError(f"--{given[0].replace('_', '-')}: does not apply to --method {cfg.method}", "it is a PPO option")
        n, min_n = cfg.num_generations, 1 if cfg.method == "ppo" else 2
        if n < min_n:
            raise PrefcliError(f"--num-generations {n}: {cfg.method} needs at least {min_n} samples per prompt",
                               "its advantages compare samples of the same prompt" if min_n > 1 else None)
        if cfg.batch_size < 1 or cfg.batch_size % n:
            raise PrefcliError(f"--batch-size {cfg.batch_size}: must be a positive multiple of --num-generations {n}",
                               "every prompt's samples share one micro-batch")
        if cfg.kl_coef < 0:
            raise PrefcliError(f"--kl-coef {cfg.kl_coef}: must be >= 0")
        if cfg.kl_target is not None and (cfg.kl_target <= 0 or cfg.kl_coef == 0):
            raise PrefcliError(f"--kl-target {cfg.kl_target}: needs a target > 0 and a starting --kl-coef > 0")
        if cfg.ppo_epochs < 1 or (cfg.method == "rloo" and cfg.ppo_epochs != 1):
            raise PrefcliError(f"--ppo-epochs {cfg.ppo_epochs}: " + ("rloo is on-policy REINFORCE: use 1" if cfg.method == "rloo" else "must be at least 1"))
        if cfg.temperature <= 0:
            raise PrefcliError(f"--temperature {cfg.temperature}: online RL samples, it needs a temperature > 0", "use 1.0")
        if cfg.max_tokens < 1:
            raise PrefcliError(f"--max-tokens {cfg.max_tokens}: must be at least 1")
        if cfg.missing_eos_penalty < 0:
            raise PrefcliError(f"--missing-eos-penalty {cfg.missing_eos_penalty}: must be >= 0 (it is subtracted)")
        if cfg.clip_range <= 0:
            raise PrefcliError(f"--clip-range {cfg.clip_range}: must be > 0")
        if cfg.loss_norm not in ("sequence", "token", "dr_grpo"):
            raise PrefcliError(f"loss_norm {cfg.loss_norm!r}: use sequence, token or dr_grpo")
        if cfg.reference and cfg.kl_coef == 0:
            raise PrefcliError("--reference: unused with --kl-coef 0", "leave --reference out, or give a KL coefficient")
        if cfg.max_steps is not None and cfg.max_steps < 1:
            raise PrefcliError(f"--max-steps {cfg.max_steps}: must be at least 1")
        if cfg.epochs is not None and cfg.epochs <= 0:
            raise PrefcliError(f"--epochs {cfg.epochs}: must be > 0")
        k = cfg.ppo_epochs
        if cfg.max_steps is not None:
            cfg.max_steps = k * math.ceil(cfg.max_steps / k)
        cfg.save_every = k * math.ceil(cfg.save_every / k)
        return cfg


def resolve(cfg: RLConfig) -> RLConfig:
    """RLConfig.resolved(), the reward left as given (run() reports a missing "rm" itself)."""
    return dataclasses.replace(cfg.resolved(), reward_model=list(cfg.reward_model))


# ---------------------------------------------------------------- losses
def make_loss_fn(cfg: RLConfig):
    def loss_fn(model, batch):
        r, timings = batch
        logits, values = model(r.input_ids, r.attention_mask, r.start)
        logp = token_logprobs(logits, r.input_ids[:, r.start:])
        # One update per batch: the old policy is this one (ratio 1, with its gradient).
        # More: the sampling log-probs are the old policy's.
        old = r.logprobs if cfg.ppo_epochs > 1 else None
        kl_coef = float(unwrap(model).kl_coef)
        metrics = {}
        if cfg.method == "ppo":
            loss, metrics = rl.ppo_policy_loss(logp, logp.detach() if old is None else old, r.advantages, r.mask, cfg.clip_range)
            vf_loss, vf_metrics = rl.ppo_value_loss(values.float(), r.values, r.returns, r.mask, cfg.value_clip)
            metrics = {**metrics, **vf_metrics, "policy_loss": loss.detach(), "value_loss": vf_loss.detach()}
            loss = loss + cfg.vf_coef * vf_loss
        elif cfg.method == "grpo":
            loss, metrics = rl.grpo_loss(logp, old, r.ref_logprobs, r.advantages, r.mask, cfg.clip_range,
                                         beta=kl_coef, norm=cfg.loss_norm)
            if "kl" in metrics:
                metrics["kl_k3"] = metrics.pop("kl")  # the loss's token-mean k3; "kl" is nats per reply
        else:
            loss = rl.reinforce_loss(logp, r.advantages, r.mask)
        with torch.no_grad():
            metrics["entropy"] = rl.masked_mean(rl.entropy_from_logits(logits.detach()), r.mask)
        return loss, {**r.metrics, **metrics, **timings, "tokens": int(r.attention_mask.sum())}

    return loss_fn


# ---------------------------------------------------------------- inputs
def read_prompts(cfg: RLConfig) -> tuple[list[list[dict]], list[dict]]:
    if cfg.num_prompts is not None and cfg.num_prompts < 1:
        raise PrefcliError(f"--num-prompts {cfg.num_prompts}: must be at least 1")
    return sources.prompts(cfg.prompts, "rl", cfg.num_prompts)


def encode_prompts(tok: Tokenizer, prompts: list[list[dict]], context: int, max_tokens: int):
    """Prompt ids with the generation prompt; prompts leaving no room for a reply are dropped."""
    room = context - max_tokens
    kept, ids = [], []
    for p in prompts:
        x = tok.chat_ids(p, add_generation_prompt=True)
        if len(x) <= room:
            kept.append(p)
            ids.append(x)
    if not kept:
        raise PrefcliError(f"--prompts: no prompt fits in the context ({context} tokens) with room for --max-tokens {max_tokens}",
                           "lower --max-tokens or use shorter prompts")
    if len(kept) < len(prompts):
        note(f"warning: {len(prompts) - len(kept)} of {len(prompts)} prompts leave no room for {max_tokens} reply tokens "
             f"in the {context}-token context and were skipped")
    return kept, ids


def load_value_model(ws: Workspace, cfg: RLConfig, policy_ref: str, tok: Tokenizer):
    """PPO's value model: --value-model, else the first --reward-model, else the policy with a fresh head."""
    from prefcli.rewards import split_weight

    candidates = [(cfg.value_model, "--value-model")] if cfg.value_model else [
        (split_weight(spec, "--reward-model")[0], "--reward-model") for spec in cfg.reward_model[:1]]
    for ref, flag in candidates:
        loaded = load_model_artifact(ws, ref, flag, kind="reward")
        if same_tokenizer(loaded.tokenizer, tok):
            return loaded.model, loaded.parent(), f"reward model {ref}"
        if flag == "--value-model":
            raise PrefcliError(f"--value-model: {loaded.path} uses a different tokenizer from the policy",
                               "a value model reads the policy's tokens: pick one made from the same base")
        note(f"note: reward model {ref} has another tokenizer; the value model starts from the policy instead")
    torch.manual_seed(cfg.seed)  # the fresh score head: the same on every run and every rank
    loaded = load_model_artifact(ws, policy_ref, "--policy", kind="causal_lm", score_head=True)
    value = loaded.model
    value.lm_head = None
    return value, loaded.parent(), f"policy {policy_ref} with a fresh score head"


def _read_metric_lines(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def count(model: nn.Module | None) -> int:
    return sum(p.numel() for p in model.parameters()) if model is not None else 0


# ---------------------------------------------------------------- the stage
def run(cfg: RLConfig, ws: Workspace) -> dict:
    t0 = time.time()
    given_steps, given_save = cfg.max_steps, cfg.save_every
    cfg = resolve(cfg)
    out = cfg.out or cfg.method
    policy = load_model_artifact(ws, cfg.policy, "--policy", kind="causal_lm")
    model, tok = prepare_for_training(policy.model, cfg), policy.tokenizer
    if not tok.has_chat_template:
        raise PrefcliError(f"--policy: {policy.path} has no chat template", "align an SFT model first (prefcli align --method sft)")
    if not cfg.prompts:  # the demo's RL prompts suit only models made from the demo data
        require_prompts_unless_demo({cfg.policy: policy.path})
    context = model.config.max_position_embeddings
    if cfg.max_tokens >= context:
        raise PrefcliError(f"--max-tokens {cfg.max_tokens}: the policy's context is {context} tokens", "leave room for the prompt")
    ws.check_writable("models", out, cfg.overwrite or cfg.resume)
    if cfg.method == "ppo":
        ws.check_writable("models", f"{out}-value", cfg.overwrite or cfg.resume)

    device = resolve_device(cfg.device)
    reward_models = list(cfg.reward_model)
    if not reward_models and not cfg.reward_fn:
        if not ws.exists("models", "rm"):
            raise PrefcliError("no reward given and the workspace has no reward model 'rm'",
                               "train one (prefcli reward train) or pass --reward-model NAME / --reward-fn demo|MODULE:FUNCTION")
        reward_models = ["rm"]
        cfg.reward_model = reward_models
    rewards = build_rewards(ws, reward_models, cfg.reward_fn, device)
    if not cfg.prompts:  # the demo's RL prompts suit only models made from the demo data
        require_prompts_unless_demo({cfg.policy: policy.path})
    prompts, inputs = read_prompts(cfg)
    prompts, prompt_ids = encode_prompts(tok, prompts, context, cfg.max_tokens)
    parents = [policy.parent(), *rewards.parents, *inputs]

    # The reference: the policy's starting weights (or --reference), frozen; none without a KL term.
    reference = None
    if cfg.kl_coef > 0:
        if cfg.reference:
            ref = load_model_artifact(ws, cfg.reference, "--reference", kind="causal_lm")
            if not same_tokenizer(ref.tokenizer, tok):
                raise PrefcliError(f"--reference: {ref.path} uses a different tokenizer from the policy", "pick a reference made from the same base")
            reference = ref.model
            parents.append(ref.parent())
        elif lora.has_adapters(model):
            reference = lora.AdaptersOff(model)  # the policy with adapters off: no second copy
        else:
            reference = copy.deepcopy(model)
        if not isinstance(reference, lora.AdaptersOff):
            reference.requires_grad_(False).eval().to(device)

    value, value_source = None, None
    if cfg.method == "ppo":
        value, value_parent, value_source = load_value_model(ws, cfg, cfg.policy, tok)
        value = prepare_for_training(value, cfg, reward=True)
    module = RLModel(model, value, cfg.kl_coef)

    if cfg.max_steps is None:  # --epochs: passes over the prompts, in whole batches of rollouts
        prompts_per_batch = cfg.batch_size // cfg.num_generations * cfg.grad_accum * dist.world_size()
        steps = math.ceil(cfg.epochs * len(prompts) / prompts_per_batch) * cfg.ppo_epochs
    else:
        steps = cfg.max_steps
    save_every = cfg.save_every
    if given_steps not in (None, steps) or given_save != save_every:
        note(f"note: with --ppo-epochs {cfg.ppo_epochs}, steps and checkpoints fall on whole batches of rollouts: "
             f"--max-steps {steps}, --save-every {save_every}")
    lr = cfg.lr if cfg.lr is not None else default_lr(METHOD_DEFAULTS[cfg.method]["lr"], model)
    tcfg = TrainConfig(max_steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=lr,
                       warmup=cfg.warmup, weight_decay=cfg.weight_decay, save_every=save_every, seed=cfg.seed,
                       device=cfg.device, compile=cfg.compile, fsdp=cfg.fsdp)

    run_dir = prepare_run(ws, out, resume=cfg.resume, overwrite=cfg.overwrite, config=to_dict(cfg))
    trainer = None
    batches = Rollouts(cfg, tok, prompts, prompt_ids, rewards, reference, lambda: trainer)
    guard = CollapseGuard(cfg.guard, "rl", "a higher --kl-coef or a lower --lr")
    trainer = Trainer(module, guard.watch(make_loss_fn(cfg)), batches, tcfg, run_dir, desc=f"{cfg.method} {out}")
    t_train = time.perf_counter()
    summary = trainer.train(resume=cfg.resume)
    train_wall = time.perf_counter() - t_train
    trained: RLModel = trainer.full_model()
    params = {"policy": count(trained.policy), "value": count(trained.value),
              "reference": 0 if isinstance(reference, lora.AdaptersOff) else count(reference)}
    seconds = batches.seconds
    batches.reference, batches.cache, reference = None, {}, None  # free the reference and the last rollouts

    lines = _read_metric_lines(run_dir)
    last = lines[-1] if lines else {}
    keep = ("reward", "reward_std", "kl", "entropy", "clipfrac", "value_loss", "reply_len", "distinct2", "truncated", "kl_coef")
    metrics = {
        "train_loss": round(summary.get("train_loss", float("nan")), 4),
        "steps": summary.get("steps"),  # also when --epochs set them
        "lr": float(f"{tcfg.lr:.3g}"),  # the peak rate trained with (`default_lr` when --lr was not given)
        "reward_first": round(lines[0]["reward"], 4) if lines and "reward" in lines[0] else None,
        **{k: round(last[k], 4) for k in keep if k in last},
        **{k: round(v, 4) for k, v in last.items() if k.startswith("reward/")},
        **guard.summary(),
    }
    # This process's wall time split: sampling, the rest of the rollout (scores, reference
    # and value passes), and training (forward, backward, update, checkpoints).
    timing = {"seconds_generate": round(seconds["generate"], 1), "seconds_rollout": round(seconds["rollout"], 1),
              "seconds_train": round(train_wall - seconds["rollout"], 1)}
    config = to_dict(cfg)
    save_model_artifact(ws, out, trained.policy.float().cpu(), policy.path, kind="causal_lm", stage=f"align {cfg.method}",
                        config=config, parents=parents, metrics=metrics, overwrite=cfg.overwrite or cfg.resume, chat=True,
                        extra_meta={"value_model": f"{out}-value"} if cfg.method == "ppo" else None)
    if cfg.method == "ppo":
        save_model_artifact(ws, f"{out}-value", trained.value.float().cpu(), policy.path, kind="reward",
                            stage=f"align {cfg.method} (value model)", config=config,
                            parents=[value_parent, {"kind": "models", "name": out}],
                            metrics={"value_loss": metrics.get("value_loss")}, overwrite=cfg.overwrite or cfg.resume,
                            chat=False, extra_meta={"initialised_from": value_source})
    dist.barrier()
    return {"model": out, "method": cfg.method, **metrics, **timing, "parameters": params,
            "reference": None if cfg.kl_coef == 0 else (cfg.reference or cfg.policy),
            "seconds": round(time.time() - t0, 1)}
