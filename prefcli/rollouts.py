"""Online RL's trained module and rollout engine: what `align --method ppo|grpo|rloo` trains on.

`RLModel` holds the policy, PPO's value model and the KL coefficient; `Rollouts` is the
Trainer's `batches`: every step it samples replies with the KV-cache engine
(`prefcli.inference.sample_ids`), scores them, and computes the method's advantages
(`prefcli.objectives.rl`). It reads the settings of a resolved `RLConfig`.

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

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from prefcli import distributed as dist
from prefcli import lora
from prefcli.generate import Completion
from prefcli.guard import distinct_2
from prefcli.inference import reply_logits, reply_token_logps, sample_ids
from prefcli.model import Transformer
from prefcli.objectives import rl
from prefcli.tokenizer import Tokenizer
from prefcli.trainer import unwrap


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


class Rollouts:
    """Samples, scores and prepares the rollouts of each step (the Trainer's `batches`)."""

    def __init__(self, cfg, tok: Tokenizer, prompts: list[list[dict]], prompt_ids: list[list[int]],
                 rewards, reference: Transformer | None, trainer_of):
        """cfg: a resolved RLConfig (prefcli.stages.rl); trainer_of() -> the Trainer (its model and device)."""
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
        trained: RLModel = unwrap(trainer.model)  # holds the kl_coef buffer the checkpoint keeps
        module: RLModel = trainer.full_model()  # whole weights to sample and score with (FSDP: gathered)
        reference = self.reference
        if isinstance(reference, lora.AdaptersOff) and module is not trained:
            reference = lora.AdaptersOff(module.policy)
        device = trainer.device
        n = cfg.num_generations
        idx = dist.batch_indices(batch, micro, cfg.batch_size // n, cfg.grad_accum, len(self.prompt_ids), seed=cfg.seed)
        prompts = [self.prompts[i] for i in idx for _ in range(n)]
        prompt_ids = [self.prompt_ids[i] for i in idx for _ in range(n)]
        seed = cfg.seed * 1_000_003 + (batch * cfg.grad_accum + micro) * dist.world_size() + dist.rank()
        t0 = time.perf_counter()
        samples = sample_ids(module.policy, tok, [self.prompt_ids[i] for i in idx], samples=n, max_tokens=cfg.max_tokens,
                             temperature=cfg.temperature, seed=seed, batch_size=len(prompt_ids))
        gen_s = time.perf_counter() - t0
        r = assemble(prompt_ids, [Completion(s["tokens"], s["logprobs"], s["finished"]) for s in samples], tok.pad_id)
        r = Rollout(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in r.__dict__.items()})
        replies = [s["text"] for s in samples]
        scores, parts = self.rewards(prompts, replies)
        scores = torch.tensor(scores, dtype=torch.float32, device=device)
        penalised = rl.truncation_penalty(scores, r.finished, cfg.missing_eos_penalty)

        kl_coef = float(trained.kl_coef)
        seq_kl = None
        if reference is not None:
            r.ref_logprobs = reply_token_logps(reference, r.input_ids, r.attention_mask, r.start, r.mask)
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
            # the collapse guard (prefcli/guard.py) watches replies turning repetitive
            "distinct2": torch.tensor(sum(distinct_2(s["tokens"]) for s in samples) / max(1, len(samples))),
        }
        if seq_kl is not None:
            r.metrics["kl"] = seq_kl.mean()
            if self.controller is not None:  # steer the coefficient for the next batch
                self.controller.value = kl_coef
                mean_kl = dist.all_reduce_mean(float(seq_kl.mean()))
                trained.kl_coef.fill_(self.controller.update(mean_kl, len(scores) * dist.world_size()))
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
