"""The reward-model loss, as a pure tensor function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise loss on scalar rewards [B] (Ouyang et al. 2022, InstructGPT).

    loss = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2)

    `margin` (Llama 2, Touvron et al. 2023) asks for a larger gap on clearly-better pairs.
    The centering term (Eisenstein et al. 2023, "Helping or Herding?"; TRL's
    `center_rewards_coefficient`) pulls rewards towards mean zero.
    Metrics (detached): loss, accuracy (share of r_c > r_r), margin (mean r_c - r_r),
    rewards/chosen, rewards/rejected (means).
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    metrics = {
        "loss": loss.detach(),
        "accuracy": (diff > 0).float().mean().detach(),
        "margin": diff.mean().detach(),
        "rewards/chosen": chosen_rewards.mean().detach(),
        "rewards/rejected": rejected_rewards.mean().detach(),
    }
    return loss, metrics
