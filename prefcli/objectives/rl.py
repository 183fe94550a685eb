"""Online-RL math as pure tensor functions: PPO, GRPO, RLOO and their helpers.

No models and no generation here: callers pass per-token log-probs of the sampled
reply tokens, values and rewards, and get advantages and losses back.

Conventions
- Per-token tensors are [B, T] over the *response* tokens only.
- `mask` [B, T] is 1 on real reply tokens (the end token included) and 0 on the
  padding after the reply; each row's real tokens come first. bool, int or float.
- Log-probs are the log-probs of the sampled tokens; pass float32 (exp of bf16
  log-prob differences is too coarse for ratios near 1).
- Positions where mask is 0 never change a result or a gradient, even if they
  hold NaN or inf: losses zero them before any arithmetic.
- Argument errors are ValueError: the stage that turns user options into these
  arguments checks them first and raises PrefcliError naming the option.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------- masked statistics


def _zero_pad(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with padding set to 0 (a where, not a product, so NaN/inf there vanish)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over everything or along `dim`.

    An empty mask (or an empty row with `dim`) gives 0, not NaN.
    """
    m = mask.to(x.dtype)
    if dim is None:
        return _zero_pad(x, mask).sum() / m.sum().clamp(min=1)
    return _zero_pad(x, mask).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the real entries of x (all of them together).

    unbiased=True applies Bessel's correction n / (n - 1), as TRL's masked_var,
    and needs at least 2 real entries.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n.item() < 2:
            raise ValueError(f"unbiased masked variance needs at least 2 real entries, got {int(n.item())}")
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening: (x - mean) / sqrt(var + eps) over the real entries.

    mean and the unbiased var are taken over all real entries of the batch (as
    TRL's masked_whiten). shift_mean=False adds the mean back (scale only, as PPO
    does for rewards). Padding comes out as 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_pad(out, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: H = -sum_v p_v log p_v.

    logits [B, T, V] -> [B, T], computed in float32. Tokens with p = 0 (logit
    -inf, e.g. after top-k filtering) add 0, not NaN.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros((), device=p.device)).sum(-1)


# ---------------------------------------------------------------- rewards and KL


def _last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row; ValueError for a row with none."""
    m = mask.bool()
    empty = ~m.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no real response tokens; every reply needs at least one")
    positions = torch.arange(1, m.shape[1] + 1, device=m.device)
    return (m * positions).argmax(dim=1)  # largest position holding a real token


def place_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence score on the last real token of each reply, 0 everywhere else.

    scores [B], mask [B, T] -> [B, T]. A row with no real token is a ValueError:
    a reply always has at least its end token (or the one token that hit the
    length limit), so an empty row is a bug upstream and its score would be lost.
    """
    last = _last_token_index(mask)
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    out[torch.arange(mask.shape[0], device=mask.device), last] = scores
    return out


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens.

    k1 = logp - ref_logp                      (unbiased, can be negative)
    k3 = exp(ref - logp) - (ref - logp) - 1   (unbiased, always >= 0, lower variance)
    Schulman, "Approximating KL divergence" (2020). Padding is not masked here.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {kind!r}; use 'k1' or 'k3'")


def ppo_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> torch.Tensor:
    """Per-token PPO reward: r_t = -kl_coef * KL_t, plus the score on the last real token.

    Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences";
    Ouyang et al. 2022 (InstructGPT); as TRL's PPOTrainer. -> [B, T], 0 on padding.
    """
    kl = kl_penalty(logp, ref_logp, kind)
    return _zero_pad(-kl_coef * kl, mask) + place_rewards(scores, mask).to(kl.dtype)


def truncation_penalty(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores with `penalty` subtracted from every reply that did not finish.

    finished [B] bool: the reply ended with its end token; False means it hit the
    length limit. score - penalty, as TRL's `missing_eos_penalty` (penalty >= 0).
    Subtracting keeps the reward model's ranking among truncated replies.
    """
    if penalty < 0:
        raise ValueError(f"truncation penalty must be >= 0 (it is subtracted), got {penalty}")
    return torch.where(finished.bool(), scores, scores - penalty)


# ---------------------------------------------------------------- PPO


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages, returns), both [B, T].

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t
    Schulman et al. 2016 "High-Dimensional Continuous Control Using GAE".
    The episode ends at the last real token: V and A past it count as 0 (no
    bootstrapping into padding), and advantages and returns are 0 on padding.
    Not whitened; call `whiten` on the advantages if wanted.
    """
    r = _zero_pad(rewards.detach(), mask)  # targets, not part of any graph
    v = _zero_pad(values.detach(), mask)
    m = mask.to(r.dtype)
    T = r.shape[1]
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = v[:, t]
    returns = _zero_pad(adv + v, mask)
    return adv, returns


def _clipped_surrogate(ratio, advantages, clip):
    """Per-token -min(ratio * A, clip(ratio, 1-c, 1+c) * A) and where the clip bit."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    # the clipped term wins strictly exactly when A > 0, ratio > 1+c or A < 0, ratio < 1-c
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, masked token-mean over the whole batch.

    ratio_t = exp(logp_t - old_logp_t)
    L = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1-c, 1+c))
    Schulman et al. 2017 "Proximal Policy Optimization Algorithms".
    advantages [B, T] (from `gae`). Metrics (detached): clipfrac = share of real
    tokens where the clipped term is the one used; approx_kl = 0.5 * mean (logp -
    old_logp)^2, as TRL's PPOTrainer.
    """
    logp, old_logp, advantages = (_zero_pad(x, mask) for x in (logp, old_logp.detach(), advantages.detach()))
    ratio = torch.exp(logp - old_logp)
    per_token, was_clipped = _clipped_surrogate(ratio, advantages, clip)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean(was_clipped.to(logp.dtype), mask),
            "approx_kl": 0.5 * masked_mean((logp - old_logp) ** 2, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, masked token-mean over the whole batch.

    V_clip = old_V + clip(V - old_V, -c, c)
    L = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)
    As in OpenAI baselines' PPO2 and TRL's PPOTrainer. Metric vf_clipfrac = share
    of real tokens where the clipped error is strictly larger (and so used).
    """
    values, old_values, returns = (_zero_pad(x, mask) for x in (values, old_values.detach(), returns.detach()))
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask)}
    return loss, metrics


class FixedKLController:
    """A KL coefficient that stays where it was set."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """KL coefficient steered so the measured KL approaches `target`.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    Ziegler et al. 2019 "Fine-Tuning Language Models from Human Preferences".
    n_steps is the number of samples (episodes) since the last update, as in TRL.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ---------------------------------------------------------------- GRPO and RLOO


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """scores [B] -> [B / G, G]; prompt i's samples are rows i*G .. i*G+G-1."""
    if group_size < 2:
        raise ValueError(f"group size must be at least 2 to compare samples, got {group_size}")
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"{tuple(scores.shape)} scores do not split into groups of {group_size}")
    return scores.view(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: A_i = (r_i - mean_group) / (std_group + eps).

    Shao et al. 2024 "DeepSeekMath" (GRPO). std is the unbiased sample std (as
    TRL); scale=False gives r_i - mean_group only (Dr. GRPO, Liu et al. 2025).
    A group whose rewards are all equal gets advantage 0. [B] -> [B].
    """
    g = _groups(scores, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j within each group.

    Ahmadian et al. 2024 "Back to Basics: Revisiting REINFORCE Style Optimization
    for Learning from Human Feedback in LLMs". [B] -> [B].
    """
    g = _groups(scores, group_size)
    others_mean = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others_mean).reshape(-1)


def reinforce_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level REINFORCE: L = -mean_i A_i * sum_t logp_{i,t}.

    The whole reply is one action (Ahmadian et al. 2024, RLOO): its log-prob is
    the sum over real tokens, not divided by its length; then the mean over the
    B replies. advantages [B] (e.g. from `rloo_advantages`), treated as constants.
    """
    seq_logp = _zero_pad(logp, mask).sum(dim=1)
    return -(advantages.detach() * seq_logp).mean()


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
    norm: str = "sequence",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss: clipped surrogate with the sequence advantage on every token, plus k3 KL.

    ratio_t = exp(logp_t - old_logp_t);  A_i broadcast over reply i's tokens
    l_t = -min(ratio_t * A_i, clip(ratio_t, 1-c, 1+c) * A_i) + beta * k3_t
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (only when ref_logp is given)
    Shao et al. 2024 "DeepSeekMath".

    old_logp=None means one update per generation batch: old = logp.detach(), so
    the ratio is 1 in value but carries the gradient.
    norm (how token losses become one number):
      "sequence": mean over each reply's tokens, then mean over replies (the paper)
      "token":    sum over all real tokens / number of real tokens in the batch
                  (DAPO's token-level mean; TRL's "bnpo", and its "dapo" when the
                  batch is the whole global batch)
      "dr_grpo":  sum over all real tokens / (B * T), a constant when T is padded
                  to the generation limit (Dr. GRPO, Liu et al. 2025)
    Metrics (detached): clipfrac = share of real tokens where the clip bit;
    kl = token-mean k3, only when ref_logp is given.
    """
    logp = _zero_pad(logp, mask)
    old_logp = logp.detach() if old_logp is None else _zero_pad(old_logp.detach(), mask)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.detach().unsqueeze(1).to(logp.dtype)
    per_token, was_clipped = _clipped_surrogate(ratio, adv, clip)
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, _zero_pad(ref_logp.detach(), mask), "k3")
        per_token = per_token + beta * kl

    if norm == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif norm == "token":
        loss = masked_mean(per_token, mask)
    elif norm == "dr_grpo":
        loss = _zero_pad(per_token, mask).sum() / mask.numel()
    else:
        raise ValueError(f"unknown GRPO normalisation {norm!r}; use 'sequence', 'token' or 'dr_grpo'")

    with torch.no_grad():
        metrics = {"clipfrac": masked_mean(was_clipped.to(logp.dtype), mask)}
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics
