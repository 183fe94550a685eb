"""Preference losses (the DPO family and KTO), as pure tensor functions.

Inputs are summed log-probs of the completion tokens, shape [B]:
policy_chosen_logps (pc), policy_rejected_logps (pr), ref_chosen_logps (rc),
ref_rejected_logps (rr); lengths are completion token counts [B] (lm.sequence_logprobs
gives both). For the reference-based methods h = (pc - rc) - (pr - rr).

Every pair loss returns (loss, metrics). Metrics are detached 0-dim tensors named as TRL
names them, so a trainer can average them over micro-batches and ranks before `.item()`:
rewards/chosen, rewards/rejected (means of each method's implicit reward: beta * (pc - rc)
for the reference-based methods, beta * length-averaged logp for SimPO/ORPO, as TRL),
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (means of the summed
policy log-probs, for every method) and loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from prefcli.errors import PrefcliError

Tensor = torch.Tensor


def _avg(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-token average of a summed log-prob (TRL clamps empty completions to length 1)."""
    return logps / lengths.clamp(min=1)


def _pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, pc: Tensor, pr: Tensor, loss: Tensor) -> dict:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "loss": loss.detach(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pc.detach().mean(),
        "logps/rejected": pr.detach().mean(),
    }


def _ref_based(pc, pr, rc, rr, beta, per_pair_loss: Tensor) -> tuple[Tensor, dict]:
    loss = per_pair_loss.mean()
    return loss, _pair_metrics(beta * (pc - rc), beta * (pr - rr), pc, pr, loss)


def chosen_nll_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Negative log-likelihood of the chosen replies, per token over the whole batch.

    nll = -sum(pc) / sum(len_c), the token-weighted mean TRL's cross-entropy gives for
    the ORPO NLL term and DPO's rpo_alpha / "sft" term.
    """
    return -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def dpo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO, sigmoid loss (Rafailov et al. 2023, arXiv:2305.18290), with cDPO label smoothing.

    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    eps = label_smoothing: the chance a label is flipped (cDPO, Mitchell 2023); 0 is plain DPO.
    """
    logits = beta * ((pc - rc) - (pr - rr))
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _ref_based(pc, pr, rc, rr, beta, losses)


def ipo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
             beta: float = 0.1):
    """IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17; beta is the paper's tau).

    loss = (h_avg - 1 / (2 beta))^2, h_avg = (pc - rc) / len_c - (pr - rr) / len_r
    Log-ratios are averaged per token, as TRL does (confirmed with the IPO authors), so
    the squared loss does not grow with completion length. Rewards stay beta * summed ratio.
    """
    h_avg = _avg(pc - rc, chosen_lengths) - _avg(pr - rr, rejected_lengths)
    return _ref_based(pc, pr, rc, rr, beta, (h_avg - 1 / (2 * beta)) ** 2)


def hinge_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float = 0.1):
    """SLiC hinge loss (Zhao et al. 2023, arXiv:2305.10425) on the DPO log-ratio.

    loss = relu(1 - beta h), i.e. a margin of 1 / beta on h.
    """
    return _ref_based(pc, pr, rc, rr, beta, torch.relu(1 - beta * ((pc - rc) - (pr - rr))))


def robust_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float = 0.1, label_smoothing: float = 0.1):
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), unbiased under label noise eps.

    loss = (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps), 0 <= eps < 0.5
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise PrefcliError(f"label_smoothing={label_smoothing} is out of range for method 'robust'",
                           hint="robust DPO needs 0 <= label_smoothing < 0.5; the paper suggests 0.1")
    logits = beta * ((pc - rc) - (pr - rr))
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return _ref_based(pc, pr, rc, rr, beta, losses)


def simpo_loss(pc: Tensor, pr: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
               beta: float = 2.0, simpo_gamma: float = 0.5):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): reference-free, length-normalised.

    loss = -log sigmoid(beta (pc / len_c - pr / len_r) - gamma)
    gamma = simpo_gamma is the absolute target margin, as TRL's CPOTrainer `simpo_gamma`
    (the SimPO repo's gamma_beta_ratio is gamma / beta: 0.5 / 2.0 = 0.25). No NLL term
    (TRL adds one unless cpo_alpha=0; use rpo_alpha for that). Rewards: beta * avg logp.
    """
    avg_c, avg_r = _avg(pc, chosen_lengths), _avg(pr, rejected_lengths)
    loss = -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma).mean()
    return loss, _pair_metrics(beta * avg_c, beta * avg_r, pc, pr, loss)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(pc: Tensor, pr: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float = 0.1):
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7): SFT plus an odds-ratio term, no reference.

    loss = nll_chosen - beta * mean(log sigmoid(log_odds_c - log_odds_r)),
    log_odds = avg_logp - log(1 - exp(avg_logp)), avg_logp = logp / len, as TRL's
    ORPOTrainer (beta is the paper's lambda). nll_chosen = chosen_nll_loss(): per token over
    the batch. avg_logp is clamped at -1e-6 so a certain reply (avg 0) gives no inf.
    """
    avg_c = _avg(pc, chosen_lengths).float().clamp(max=-1e-6)
    avg_r = _avg(pr, rejected_lengths).float().clamp(max=-1e-6)
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    ratio = F.logsigmoid(log_odds)
    nll = chosen_nll_loss(pc, chosen_lengths)
    loss = nll - beta * ratio.mean()
    metrics = _pair_metrics(beta * avg_c, beta * avg_r, pc, pr, loss)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()})
    return loss, metrics


def kto_loss(
    policy_desirable_logps: Tensor,
    policy_undesirable_logps: Tensor,
    ref_desirable_logps: Tensor,
    ref_undesirable_logps: Tensor,
    kl_policy_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict]:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7): unpaired good / bad replies.

    z = max(0, mean(kl_policy_logps - kl_ref_logps)), detached: the KL estimate from
        mismatched (prompt, other reply) pairs, as TRL's KTOTrainer (None: z = 0)
    loss_d = 1 - sigmoid(beta (logratio_d - z)),  loss_u = 1 - sigmoid(beta (z - logratio_u))
    loss = mean over all replies of [w_d * loss_d ; w_u * loss_u]  (TRL's nanmean of the concat)
    Either group may be empty. Under DDP, z is this rank's mean (TRL averages z over ranks).
    Metrics: loss, kl, and when the group is present rewards/chosen, logps/chosen
    (desirable), rewards/rejected, logps/rejected (undesirable), rewards/margins (both).
    """
    if kl_policy_logps is None:
        z = policy_desirable_logps.new_zeros(())
    else:
        z = (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)
    ratio_d = policy_desirable_logps - ref_desirable_logps
    ratio_u = policy_undesirable_logps - ref_undesirable_logps
    loss_d = 1 - torch.sigmoid(beta * (ratio_d - z))
    loss_u = 1 - torch.sigmoid(beta * (z - ratio_u))
    loss = torch.cat([desirable_weight * loss_d, undesirable_weight * loss_u]).mean()

    metrics = {"loss": loss.detach(), "kl": z}
    if len(ratio_d):
        metrics["rewards/chosen"] = beta * ratio_d.detach().mean()
        metrics["logps/chosen"] = policy_desirable_logps.detach().mean()
    if len(ratio_u):
        metrics["rewards/rejected"] = beta * ratio_u.detach().mean()
        metrics["logps/rejected"] = policy_undesirable_logps.detach().mean()
    if len(ratio_d) and len(ratio_u):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


@dataclass(frozen=True)
class Method:
    """What the CLI needs to know about a preference method."""

    fn: Callable
    defaults: dict  # every option the method takes, with its default
    needs_reference: bool
    paired: bool  # chosen/rejected pairs (False: KTO's unpaired good/bad replies)
    needs_lengths: bool
    formula: str
    paper: str


METHODS: dict[str, Method] = {
    "dpo": Method(dpo_loss, {"beta": 0.1, "label_smoothing": 0.0}, True, True, False,
                  "-(1-eps) log sig(beta h) - eps log sig(-beta h), h = (pc-rc) - (pr-rr)",
                  "Rafailov et al. 2023, Direct Preference Optimization (arXiv:2305.18290)"),
    "ipo": Method(ipo_loss, {"beta": 0.1}, True, True, True,
                  "(h_avg - 1/(2 beta))^2, h_avg from per-token log-ratios",
                  "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from "
                  "Human Preferences (arXiv:2310.12036)"),
    "hinge": Method(hinge_loss, {"beta": 0.1}, True, True, False,
                    "relu(1 - beta h)",
                    "Zhao et al. 2023, SLiC-HF (arXiv:2305.10425)"),
    "robust": Method(robust_loss, {"beta": 0.1, "label_smoothing": 0.1}, True, True, False,
                     "(-(1-eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)",
                     "Chowdhury et al. 2024, Provably Robust DPO (arXiv:2403.00409)"),
    "simpo": Method(simpo_loss, {"beta": 2.0, "simpo_gamma": 0.5}, False, True, True,
                    "-log sig(beta (pc/len_c - pr/len_r) - gamma)",
                    "Meng et al. 2024, SimPO (arXiv:2405.14734)"),
    "orpo": Method(orpo_loss, {"beta": 0.1}, False, True, True,
                   "nll_c - beta log sig(log_odds_c - log_odds_r), log_odds = a - log(1 - e^a), a = logp/len",
                   "Hong et al. 2024, ORPO (arXiv:2403.07691)"),
    "kto": Method(kto_loss, {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}, True, False, False,
                  "1 - sig(beta (logratio - z)) good, 1 - sig(beta (z - logratio)) bad, z = KL estimate",
                  "Ethayarajh et al. 2024, KTO (arXiv:2402.01306)"),
}


def preference_loss(
    method: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    beta: float | None = None,
    rpo_alpha: float = 0.0,
    chosen_nll: Tensor | None = None,
    **opts,
) -> tuple[Tensor, dict]:
    """Loss and metrics of a paired method from METHODS; beta None = the method's default.

    rpo_alpha > 0 adds rpo_alpha * NLL of the chosen replies (RPO, Pang et al. 2024,
    arXiv:2404.19733; TRL's rpo_alpha, now loss_type=["sigmoid", "sft"]). Pass that NLL
    as `chosen_nll`, or pass chosen_lengths and it is chosen_nll_loss(pc, chosen_lengths).
    """
    spec = METHODS.get(method)
    if spec is None or not spec.paired:
        pair_methods = ", ".join(name for name, m in METHODS.items() if m.paired)
        hint = "kto is unpaired: use kto_loss" if spec else f"choose one of: {pair_methods}"
        raise PrefcliError(f"unknown pair preference method '{method}'", hint=hint)
    unknown = sorted(set(opts) - set(spec.defaults))
    if unknown:
        raise PrefcliError(f"option '{unknown[0]}' does not apply to method '{method}'",
                           hint=f"{method} takes: {', '.join(spec.defaults)}")
    kwargs = {**spec.defaults, **opts}
    if beta is not None:
        kwargs["beta"] = beta

    args = [policy_chosen_logps, policy_rejected_logps]
    if spec.needs_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"method '{method}' needs ref_chosen_logps and ref_rejected_logps")
        args += [ref_chosen_logps, ref_rejected_logps]
    if spec.needs_lengths:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"method '{method}' needs chosen_lengths and rejected_lengths")
        args += [chosen_lengths, rejected_lengths]
    loss, metrics = spec.fn(*args, **kwargs)

    if rpo_alpha:
        if chosen_nll is None:
            if chosen_lengths is None:
                raise ValueError("rpo_alpha needs chosen_nll or chosen_lengths")
            chosen_nll = chosen_nll_loss(policy_chosen_logps, chosen_lengths)
        loss = loss + rpo_alpha * chosen_nll
        metrics["nll_loss"] = chosen_nll.detach()
        metrics["loss"] = loss.detach()
    return loss, metrics
