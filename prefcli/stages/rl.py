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

Exact resume. The Trainer wants batches(step, micro) to be a pure function of (step, micro,
rank). Rollouts depend on the policy's weights, which the checkpoint restores, so a step's
rollouts are sampled inside batches() from the current weights, with a generator seeded by
(seed, rollout batch, micro, rank): a resumed run samples exactly the replies the
uninterrupted run sampled. With --ppo-epochs E > 1, one batch of rollouts serves E optimizer
steps; --max-steps and --save-every are then rounded up to multiples of E so that every
checkpoint falls where a new batch is sampled. The adaptive KL coefficient is a buffer of
the trained module, so it is checkpointed with the weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from prefcli import distributed as dist
from prefcli.config import to_dict
from prefcli.data.demo.lineage import require_prompts_unless_demo
from prefcli.data.examples import prompt_from_row
from prefcli.data.readers import read_rows
from prefcli.errors import PrefcliError
from prefcli.generate import Completion, generate
from prefcli.guard import CollapseGuard, check_mode, distinct_2
from prefcli.model import Transformer
from prefcli.objectives import rl
from prefcli.objectives.lm import token_logprobs
from prefcli.rewards import build_rewards
from prefcli.stages.common import load_model_artifact, note, prepare_run, save_model_artifact
from prefcli.tokenizer import Tokenizer
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


@dataclass
class RLConfig:
    method: str = "grpo"
    policy: str = "sft"
    reference: str | None = None  # default: the policy's starting weights
    out: str | None = None
    # Rewards (summed with weights); nothing given: the reward model "rm" of the workspace.
    reward_model: list[str] = field(default_factory=list)
    reward_fn: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # default: the built-in RL prompts
    num_prompts: int | None = None
    num_generations: int | None = None  # samples per prompt (grpo/rloo groups)
    temperature: float = 1.0
    max_tokens: int = 64
    guard: str = "stop"  # collapse guard (prefcli/guard.py): stop | warn | off
    missing_eos_penalty: float = 1.0  # subtracted from the score of a reply cut at max_tokens
    kl_coef: float | None = None  # 0: no reference model at all
    kl_target: float | None = None  # adaptive coefficient steering the KL per reply (nats) here
    kl_horizon: float = 10000.0
    clip_range: float = 0.2
    ppo_epochs: int | None = None  # optimizer steps per batch of rollouts (grpo: mu)
    loss_norm: str = "sequence"  # grpo: sequence | token | dr_grpo
    scale_rewards: bool = True  # grpo: divide by the group's std
    # PPO only
    value_model: str | None = None  # default: the first --reward-model, else the policy + fresh head
    vf_coef: float | None = None
    value_clip: float | None = None
    gamma: float | None = None
    lam: float | None = None
    whiten_rewards: bool | None = None
    # Training
    max_steps: int | None = None
    epochs: float | None = None  # passes over the prompts
    batch_size: int | None = None  # replies per micro-batch per process (num_generations per prompt)
    grad_accum: int = 1
    lr: float | None = None
    warmup: int = 0
    weight_decay: float = 0.0
    save_every: int = 20
    resume: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False


PPO_DEFAULTS = dict(vf_coef=0.1, value_clip=0.2, gamma=1.0, lam=0.95, whiten_rewards=False)


def resolve(cfg: RLConfig) -> RLConfig:
    """The config with every method default filled in, checked; errors name the option."""
    if cfg.method not in RL_METHODS:
        raise PrefcliError(f"--method {cfg.method}: not an online RL method", f"choose one of {', '.join(RL_METHODS)}")
    for name, value in METHOD_DEFAULTS[cfg.method].items():
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
    check_mode(cfg.guard)
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
    # One batch of rollouts serves ppo_epochs steps: steps and checkpoints fall on whole batches.
    k = cfg.ppo_epochs
    if cfg.max_steps is not None:
        cfg.max_steps = k * math.ceil(cfg.max_steps / k)
    cfg.save_every = k * math.ceil(cfg.save_every / k)
    return cfg


# ---------------------------------------------------------------- the trained module
class RLModel(nn.Module):
    """What the Trainer trains: the policy, PPO's value model, and the KL coefficient.

    One module so one checkpoint holds everything a resume needs (parameters policy.* and
    value.*, buffer kl_coef, which the adaptive controller changes as training goes).
    forward returns the policy's logits for the reply tokens [B, R, V] and the value model's
    values [B, R] (None without one): position start - 1 + t predicts reply token t.
    """

    def __init__(self, policy: Transformer, value: Transformer | None = None, kl_coef: float = 0.0):
        super().__init__()
        self.policy = policy
        self.value = value
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef)))  # float32: MPS has no float64

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int):
        logits = reply_logits(self.policy, input_ids, attention_mask, start)
        values = None
        if self.value is not None:
            values = self.value.token_scores(input_ids, attention_mask=attention_mask)[:, start - 1:-1]
        return logits, values


def reply_logits(model: Transformer, input_ids, attention_mask, start: int) -> torch.Tensor:
    """Logits that predict the reply tokens (columns start..end): the head runs on those only."""
    hidden = model(input_ids, attention_mask=attention_mask, return_hidden=True)[:, start - 1:-1]
    return model.lm_head(hidden)


# ---------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    """One micro-batch of sampled replies, laid out for one forward pass.

    input_ids is [B, P + R]: each prompt left-padded to P columns, then its reply from
    column P (= start), right-padded to R. Per-token tensors are [B, R] over reply columns.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    start: int
    mask: torch.Tensor  # [B, R] 1 on real reply tokens (the end token included), 0 on padding
    logprobs: torch.Tensor  # [B, R] sampling log-probs (raw model, temperature 1), 0 on padding
    finished: torch.Tensor  # [B] True when the reply ended with a stop token
    ref_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None  # [B] (grpo, rloo) or [B, R] (ppo)
    values: torch.Tensor | None = None  # ppo: [B, R] values at sampling time
    returns: torch.Tensor | None = None  # ppo: [B, R]
    metrics: dict = field(default_factory=dict)


def assemble(prompts: list[list[int]], completions: list[Completion], pad_id: int) -> Rollout:
    """Prompt ids and their sampled completions -> a Rollout (no scores yet)."""
    P = max(len(p) for p in prompts)
    R = max(len(c.tokens) for c in completions)
    B = len(prompts)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + R), dtype=torch.long)
    mask = torch.zeros((B, R), dtype=torch.float32)
    logprobs = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(c.tokens)
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + n] = torch.tensor(c.tokens, dtype=torch.long)
        attn[i, P - len(p):P + n] = 1
        mask[i, :n] = 1
        logprobs[i, :n] = torch.tensor(c.logprobs)
    finished = torch.tensor([c.finished for c in completions], dtype=torch.bool)
    return Rollout(ids, attn, P, mask, logprobs, finished)


@torch.no_grad()
def token_logps(model: Transformer, r: Rollout) -> torch.Tensor:
    """A frozen model's log-probs of the reply tokens [B, R], 0 on padding."""
    logits = reply_logits(model, r.input_ids, r.attention_mask, r.start)
    return token_logprobs(logits, r.input_ids[:, r.start:]) * r.mask


class Rollouts:
    """Samples, scores and prepares the rollouts of each step (the Trainer's `batches`)."""

    def __init__(self, cfg: RLConfig, tok: Tokenizer, prompts: list[list[dict]], prompt_ids: list[list[int]],
                 rewards, reference: Transformer | None, trainer_of):
        self.cfg, self.tok, self.prompts, self.prompt_ids = cfg, tok, prompts, prompt_ids
        self.rewards, self.reference, self.trainer_of = rewards, reference, trainer_of
        self.controller = (rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                           if cfg.kl_target is not None else None)
        self.cache: dict[int, Rollout] = {}  # micro -> the rollouts of the current batch
        self.cached_batch = -1
        self.mark: float | None = None  # when the last rollout ended (see __call__)
        self.seconds = {"generate": 0.0, "rollout": 0.0}  # totals in this process

    def __call__(self, step: int, micro: int):
        """(rollout, timings) for micro-batch `micro` of optimizer step `step`.

        Timings: the Trainer calls this at the start of each micro-batch and has no end-of-
        step hook, so the time since the last rollout ended is training (the previous
        micro-batch's forward, backward and update; 0 on a process's first step). Each is
        reported times grad_accum, so the Trainer's mean over micro-batches is the step's total.
        """
        start = time.perf_counter()
        train_s = start - self.mark if self.mark is not None else 0.0
        batch = step // self.cfg.ppo_epochs  # one batch of rollouts per ppo_epochs steps
        gen_s = 0.0
        if batch != self.cached_batch:
            self.cache, self.cached_batch = {}, batch
        if micro not in self.cache:
            self.cache[micro], gen_s = self.sample(batch, micro)
        roll_s = time.perf_counter() - start if gen_s else 0.0
        self.seconds["generate"] += gen_s
        self.seconds["rollout"] += roll_s
        self.mark = time.perf_counter()
        a = self.cfg.grad_accum
        return self.cache[micro], {"time/generate_s": gen_s * a, "time/rollout_s": roll_s * a, "time/train_s": train_s * a}

    def sample(self, batch: int, micro: int) -> tuple[Rollout, float]:
        cfg, tok = self.cfg, self.tok
        trainer = self.trainer_of()
        module: RLModel = unwrap(trainer.model)
        device = trainer.device
        n = cfg.num_generations
        idx = dist.batch_indices(batch, micro, cfg.batch_size // n, cfg.grad_accum, len(self.prompt_ids), seed=cfg.seed)
        prompts = [self.prompts[i] for i in idx for _ in range(n)]
        prompt_ids = [self.prompt_ids[i] for i in idx for _ in range(n)]
        seed = cfg.seed * 1_000_003 + (batch * cfg.grad_accum + micro) * dist.world_size() + dist.rank()
        gen = torch.Generator(device=device).manual_seed(seed)
        t0 = time.perf_counter()
        completions = generate(module.policy, prompt_ids, max_new_tokens=cfg.max_tokens, temperature=cfg.temperature,
                               stop_ids=tok.stop_ids(chat=True), pad_id=tok.pad_id, seed=gen)
        gen_s = time.perf_counter() - t0
        r = assemble(prompt_ids, completions, tok.pad_id)
        r = Rollout(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in r.__dict__.items()})
        replies = [tok.decode(c.tokens) for c in completions]
        scores, parts = self.rewards(prompts, replies)
        scores = torch.tensor(scores, dtype=torch.float32, device=device)
        penalised = rl.truncation_penalty(scores, r.finished, cfg.missing_eos_penalty)

        kl_coef = float(module.kl_coef)
        seq_kl = None
        if self.reference is not None:
            r.ref_logprobs = token_logps(self.reference, r)
            seq_kl = (rl.kl_penalty(r.logprobs, r.ref_logprobs, "k1") * r.mask).sum(1)

        if cfg.method == "ppo":
            self._ppo_advantages(r, module, penalised, kl_coef)
        elif cfg.method == "grpo":
            r.advantages = rl.grpo_advantages(penalised, n, scale=cfg.scale_rewards)
        else:
            total = penalised - kl_coef * seq_kl if seq_kl is not None else penalised
            r.advantages = rl.rloo_advantages(total, n)

        lengths = r.mask.sum(1)
        r.metrics = {
            "reward": scores.mean(), "reward_std": scores.std() if len(scores) > 1 else torch.zeros(()),
            **{f"reward/{name}": value for name, value in parts.items()},
            "reply_len": lengths.mean(), "truncated": (~r.finished).float().mean(), "kl_coef": kl_coef,
            "distinct2": torch.tensor(sum(distinct_2(c.tokens) for c in completions) / max(1, len(completions))),
        }
        if seq_kl is not None:
            r.metrics["kl"] = seq_kl.mean()
            if self.controller is not None:  # steer the coefficient for the next batch
                self.controller.value = kl_coef
                mean_kl = dist.all_reduce_mean(float(seq_kl.mean()))
                module.kl_coef.fill_(self.controller.update(mean_kl, len(scores) * dist.world_size()))
        return r, gen_s

    @torch.no_grad()
    def _ppo_advantages(self, r: Rollout, module: RLModel, scores: torch.Tensor, kl_coef: float) -> None:
        cfg = self.cfg
        ref = r.ref_logprobs if r.ref_logprobs is not None else r.logprobs  # no reference: KL 0
        rewards = rl.ppo_rewards(scores, r.logprobs, ref, r.mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = rl.whiten(rewards, r.mask, shift_mean=False)
        r.values = module.value.token_scores(r.input_ids, attention_mask=r.attention_mask)[:, r.start - 1:-1].float()
        advantages, r.returns = rl.gae(rewards, r.values, r.mask, cfg.gamma, cfg.lam)
        r.advantages = rl.whiten(advantages, r.mask) if r.mask.sum() > 1 else advantages


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
    if cfg.prompts:
        rows = read_rows(cfg.prompts, option="--prompts")
        prompts = [prompt_from_row(r) for r in rows]
        inputs = [{"kind": "input", "path": str(p)} for p in cfg.prompts]
    else:
        from prefcli.data import demo

        prompts = [[{"role": "user", "content": r["prompt"]}] for r in demo.rl_prompts()]
        inputs = [{"kind": "input", "name": "demo RL prompts (built-in)"}]
    if cfg.num_prompts is not None:
        if cfg.num_prompts < 1:
            raise PrefcliError(f"--num-prompts {cfg.num_prompts}: must be at least 1")
        prompts = prompts[: cfg.num_prompts]
    return prompts, inputs


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


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    from prefcli.tokenizer import same_tokenizer as same

    return same(a, b)


def load_value_model(ws: Workspace, cfg: RLConfig, policy_ref: str, tok: Tokenizer):
    """PPO's value model: --value-model, else the first --reward-model, else the policy with a fresh head."""
    from prefcli.rewards import split_weight

    candidates = [(cfg.value_model, "--value-model")] if cfg.value_model else [
        (split_weight(spec, "--reward-model")[0], "--reward-model") for spec in cfg.reward_model[:1]]
    for ref, option in candidates:
        loaded = load_model_artifact(ws, ref, option, kind="reward")
        if same_tokenizer(loaded.tokenizer, tok):
            return loaded.model, loaded.parent(), f"reward model {ref}"
        if option == "--value-model":
            raise PrefcliError(f"--value-model: {loaded.path} uses a different tokenizer from the policy",
                               "a value model reads the policy's tokens: pick one made from the same base")
        note(f"note: reward model {ref} has another tokenizer; the value model starts from the policy instead")
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
    model, tok = policy.model, policy.tokenizer
    if not tok.has_chat_template:
        raise PrefcliError(f"--policy: {policy.path} has no chat template", "align an SFT model first (prefcli align --method sft)")
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
        require_prompts_unless_demo({cfg.policy: policy.meta})
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
        else:
            reference = copy.deepcopy(model)
        reference.requires_grad_(False).eval().to(device)

    value, value_source = None, None
    if cfg.method == "ppo":
        value, value_parent, value_source = load_value_model(ws, cfg, cfg.policy, tok)
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
    tcfg = TrainConfig(max_steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                       warmup=cfg.warmup, weight_decay=cfg.weight_decay, save_every=save_every, seed=cfg.seed,
                       device=cfg.device, compile=cfg.compile)

    run_dir = prepare_run(ws, out, resume=cfg.resume, overwrite=cfg.overwrite)
    trainer = None
    batches = Rollouts(cfg, tok, prompts, prompt_ids, rewards, reference, lambda: trainer)
    guard = CollapseGuard(cfg.guard, "rl", "a higher --kl-coef or a lower --lr")
    trainer = Trainer(module, guard.watch(make_loss_fn(cfg)), batches, tcfg, run_dir, desc=f"{cfg.method} {out}")
    t_train = time.perf_counter()
    summary = trainer.train(resume=cfg.resume)
    train_wall = time.perf_counter() - t_train
    trained: RLModel = unwrap(trainer.model)
    params = {"policy": count(trained.policy), "value": count(trained.value), "reference": count(reference)}
    seconds = batches.seconds
    batches.reference, batches.cache, reference = None, {}, None  # free the reference and the last rollouts

    lines = _read_metric_lines(run_dir)
    last = lines[-1] if lines else {}
    keep = ("reward", "reward_std", "kl", "entropy", "clipfrac", "value_loss", "reply_len", "distinct2", "truncated", "kl_coef")
    metrics = {
        "train_loss": round(summary.get("train_loss", float("nan")), 4),
        "steps": summary.get("steps"),  # also when --epochs set them
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
