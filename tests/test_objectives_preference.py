"""Preference losses against numbers worked out by hand, and against TRL's own losses when installed.

Notation as in preference.py: pc, pr = policy chosen/rejected summed log-probs, rc, rr = reference;
h = (pc - rc) - (pr - rr). softplus(x) = log(1 + e^x), so -log sigmoid(x) = softplus(-x).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefcli.errors import PrefcliError
from prefcli.objectives.preference import (
    METHODS,
    chosen_nll_loss,
    dpo_loss,
    kto_loss,
    preference_loss,
)

TOL = 1e-6


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def softplus(x):
    return math.log(1 + math.exp(x))


def logsig(x):
    return -softplus(-x)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# Pair A: chosen ratio -5 - (-5.5) = 0.5, rejected ratio -6 - (-5.8) = -0.2, h = 0.7
# Pair B: chosen ratio -7 - (-7.2) = 0.2, rejected ratio -6.5 - (-6.3) = -0.2, h = 0.4
# Pair C: chosen ratio -4 - (-4)   = 0.0, rejected ratio -3 - (-3.5)   =  0.5, h = -0.5
PC, PR, RC, RR = t(-5, -7, -4), t(-6, -6.5, -3), t(-5.5, -7.2, -4), t(-5.8, -6.3, -3.5)


def test_dpo_by_hand_with_metrics():
    loss, m = preference_loss("dpo", PC, PR, RC, RR)  # beta 0.1 by default
    # -log sig(0.1 h) per pair, averaged
    assert loss.item() == pytest.approx((softplus(-0.07) + softplus(-0.04) + softplus(0.05)) / 3, abs=TOL)
    assert m["loss"].item() == pytest.approx(loss.item(), abs=TOL)
    # rewards = 0.1 * ratio: chosen [0.05, 0.02, 0], rejected [-0.02, -0.02, 0.05]
    assert m["rewards/chosen"].item() == pytest.approx(0.07 / 3, abs=TOL)
    assert m["rewards/rejected"].item() == pytest.approx(0.01 / 3, abs=TOL)
    assert m["rewards/margins"].item() == pytest.approx((0.07 + 0.04 - 0.05) / 3, abs=TOL)
    assert m["rewards/accuracies"].item() == pytest.approx(2 / 3, abs=TOL)  # pair C has the rejected ahead
    assert m["logps/chosen"].item() == pytest.approx(-16 / 3, abs=TOL)  # (-5 - 7 - 4) / 3
    assert m["logps/rejected"].item() == pytest.approx(-15.5 / 3, abs=TOL)  # (-6 - 6.5 - 3) / 3
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_dpo_beta_and_label_smoothing_by_hand():
    loss, _ = preference_loss("dpo", PC[:1], PR[:1], RC[:1], RR[:1], beta=0.5)
    assert loss.item() == pytest.approx(softplus(-0.35), abs=TOL)  # 0.5 * 0.7
    # cDPO eps=0.2 on pair A: 0.8 * -log sig(0.07) + 0.2 * -log sig(-0.07)
    loss, _ = preference_loss("dpo", PC[:1], PR[:1], RC[:1], RR[:1], label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.8 * softplus(-0.07) + 0.2 * softplus(0.07), abs=TOL)


def test_label_smoothing_zero_is_plain_dpo():
    plain, _ = dpo_loss(PC, PR, RC, RR, beta=0.3)
    smoothed, _ = dpo_loss(PC, PR, RC, RR, beta=0.3, label_smoothing=0.0)
    direct = -torch.nn.functional.logsigmoid(0.3 * ((PC - RC) - (PR - RR))).mean()
    assert plain.item() == smoothed.item() == pytest.approx(direct.item(), abs=TOL)


def test_ipo_by_hand_uses_per_token_ratios():
    lc, lr = t(2, 1), t(4, 1)
    loss, m = preference_loss("ipo", PC[:2], PR[:2], RC[:2], RR[:2], chosen_lengths=lc, rejected_lengths=lr)
    # A: 0.5/2 - (-0.2)/4 = 0.3 ; B: 0.2/1 - (-0.2)/1 = 0.4 ; target 1/(2*0.1) = 5
    assert loss.item() == pytest.approx(((0.3 - 5) ** 2 + (0.4 - 5) ** 2) / 2, abs=1e-5)  # (22.09 + 21.16) / 2
    # rewards stay beta * summed ratio, as TRL logs them
    assert m["rewards/chosen"].item() == pytest.approx((0.05 + 0.02) / 2, abs=TOL)
    loss, _ = preference_loss("ipo", PC[:1], PR[:1], RC[:1], RR[:1], beta=0.5, chosen_lengths=lc[:1],
                              rejected_lengths=lr[:1])
    assert loss.item() == pytest.approx((0.3 - 1) ** 2, abs=TOL)  # 0.49


def test_hinge_by_hand():
    # pair A: relu(1 - 0.07) = 0.93 ; pair D: ratios 10 and -10, h = 20, relu(1 - 2) = 0
    pc, pr, rc, rr = t(-5, -1), t(-6, -11), t(-5.5, -11), t(-5.8, -1)
    loss, _ = preference_loss("hinge", pc, pr, rc, rr)
    assert loss.item() == pytest.approx((0.93 + 0.0) / 2, abs=TOL)


def test_robust_by_hand():
    loss, _ = preference_loss("robust", PC[:2], PR[:2], RC[:2], RR[:2])  # label_smoothing 0.1 by default
    # (-(0.9) log sig(0.1 h) + 0.1 log sig(-0.1 h)) / 0.8 for h = 0.7, 0.4
    a = (0.9 * softplus(-0.07) + 0.1 * logsig(-0.07)) / 0.8
    b = (0.9 * softplus(-0.04) + 0.1 * logsig(-0.04)) / 0.8
    assert loss.item() == pytest.approx((a + b) / 2, abs=TOL)
    # eps = 0 is plain DPO
    loss, _ = preference_loss("robust", PC, PR, RC, RR, label_smoothing=0.0)
    assert loss.item() == pytest.approx(preference_loss("dpo", PC, PR, RC, RR)[0].item(), abs=TOL)
    with pytest.raises(PrefcliError, match="label_smoothing"):
        preference_loss("robust", PC, PR, RC, RR, label_smoothing=0.5)


def test_simpo_by_hand():
    # pair 1: -6/3 = -2 vs -10/4 = -2.5 -> 2 * 0.5 - 0.5 = 0.5
    # pair 2: -4/4 = -1 vs -3/1 = -3   -> 2 * 2.0 - 0.5 = 3.5
    pc, pr, lc, lr = t(-6, -4), t(-10, -3), t(3, 4), t(4, 1)
    loss, m = preference_loss("simpo", pc, pr, chosen_lengths=lc, rejected_lengths=lr)
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(-3.5)) / 2, abs=TOL)
    # rewards: beta * average logp = mean(2 * -2, 2 * -1) and mean(2 * -2.5, 2 * -3)
    assert m["rewards/chosen"].item() == pytest.approx(-3.0, abs=TOL)
    assert m["rewards/rejected"].item() == pytest.approx(-5.5, abs=TOL)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["logps/chosen"].item() == pytest.approx(-5.0, abs=TOL)  # summed logps, (-6 - 4) / 2
    loss, _ = preference_loss("simpo", pc[:1], pr[:1], chosen_lengths=lc[:1], rejected_lengths=lr[:1],
                              beta=1.0, simpo_gamma=0.0)
    assert loss.item() == pytest.approx(softplus(-0.5), abs=TOL)  # 1.0 * 0.5 - 0


def test_orpo_by_hand():
    # pair 1: -3/3 = -1, -8/4 = -2 ; pair 2: -1/2 = -0.5, -0.9/3 = -0.3
    pc, pr, lc, lr = t(-3, -1), t(-8, -0.9), t(3, 2), t(4, 3)
    loss, m = preference_loss("orpo", pc, pr, chosen_lengths=lc, rejected_lengths=lr)

    def log_odds(a):  # log(p / (1 - p)) with p = e^a
        return a - math.log(1 - math.exp(a))

    r1 = logsig(log_odds(-1) - log_odds(-2))
    r2 = logsig(log_odds(-0.5) - log_odds(-0.3))
    nll = (3 + 1) / (3 + 2)  # per token over the batch: -(pc1 + pc2) / (lc1 + lc2)
    assert loss.item() == pytest.approx(nll - 0.1 * (r1 + r2) / 2, abs=TOL)
    assert m["nll_loss"].item() == pytest.approx(0.8, abs=TOL)
    assert m["log_odds_ratio"].item() == pytest.approx((r1 + r2) / 2, abs=TOL)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * (-1 - 0.5) / 2, abs=TOL)
    assert m["rewards/accuracies"].item() == 0.5  # pair 2 has the rejected ahead per token


def test_orpo_certain_reply_stays_finite():
    pc = t(0.0, -1e-9).requires_grad_(True)
    loss, _ = preference_loss("orpo", pc, t(-2, -2), chosen_lengths=t(3, 3), rejected_lengths=t(3, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(pc.grad))


def test_rpo_alpha_adds_chosen_nll_by_hand():
    lc = t(2, 3)
    base, _ = preference_loss("dpo", PC[:2], PR[:2], RC[:2], RR[:2])
    # NLL per chosen token: (5 + 7) / (2 + 3) = 2.4 ; 0.5 * 2.4 = 1.2
    assert chosen_nll_loss(PC[:2], lc).item() == pytest.approx(2.4, abs=TOL)
    loss, m = preference_loss("dpo", PC[:2], PR[:2], RC[:2], RR[:2], rpo_alpha=0.5, chosen_lengths=lc)
    assert loss.item() == pytest.approx(base.item() + 1.2, abs=TOL)
    assert m["loss"].item() == pytest.approx(loss.item(), abs=TOL)
    assert m["nll_loss"].item() == pytest.approx(2.4, abs=TOL)
    loss, _ = preference_loss("hinge", PC[:2], PR[:2], RC[:2], RR[:2], rpo_alpha=2.0, chosen_nll=torch.tensor(0.25))
    assert loss.item() == pytest.approx((0.93 + 0.96) / 2 + 0.5, abs=TOL)  # relu(1 - 0.07), relu(1 - 0.04)


def kto_example():
    # desirable: ratio -4 - (-5) = 1 ; undesirable: ratios -3 - (-4) = 1 and -6 - (-5.5) = -0.5
    # KL pairs: policy - ref = [0.5, 0.1, 0.3], mean 0.3 = z
    return dict(policy_desirable_logps=t(-4), policy_undesirable_logps=t(-3, -6),
                ref_desirable_logps=t(-5), ref_undesirable_logps=t(-4, -5.5),
                kl_policy_logps=t(-4.5, -5.9, -2.7), kl_ref_logps=t(-5, -6, -3))


def test_kto_by_hand():
    loss, m = kto_loss(**kto_example(), undesirable_weight=1.5)
    d = 1 - sigmoid(0.1 * (1 - 0.3))
    u1 = 1 - sigmoid(0.1 * (0.3 - 1))
    u2 = 1 - sigmoid(0.1 * (0.3 + 0.5))
    assert loss.item() == pytest.approx((d + 1.5 * u1 + 1.5 * u2) / 3, abs=TOL)
    assert m["kl"].item() == pytest.approx(0.3, abs=TOL)
    assert m["rewards/chosen"].item() == pytest.approx(0.1, abs=TOL)
    assert m["rewards/rejected"].item() == pytest.approx(0.1 * (1 - 0.5) / 2, abs=TOL)
    assert m["rewards/margins"].item() == pytest.approx(0.1 - 0.025, abs=TOL)
    assert m["logps/rejected"].item() == pytest.approx(-4.5, abs=TOL)


def test_kto_kl_is_clamped_and_detached_and_groups_may_be_empty():
    ex = kto_example()
    ex["kl_policy_logps"] = t(-6, -7, -4).requires_grad_(True)  # policy - ref all negative -> z = 0
    ex["policy_desirable_logps"].requires_grad_(True)
    loss, m = kto_loss(**ex)
    loss.backward()
    assert m["kl"].item() == 0.0
    assert ex["kl_policy_logps"].grad is None
    d, u1, u2 = 1 - sigmoid(0.1), 1 - sigmoid(-0.1), 1 - sigmoid(0.05)
    assert loss.item() == pytest.approx((d + u1 + u2) / 3, abs=TOL)

    ex = kto_example()
    ex["policy_desirable_logps"], ex["ref_desirable_logps"] = t(), t()
    loss, m = kto_loss(**ex)
    assert loss.item() == pytest.approx((1 - sigmoid(-0.07) + 1 - sigmoid(0.08)) / 2, abs=TOL)
    assert "rewards/chosen" not in m and "rewards/margins" not in m


PAIR_INPUTS = dict(chosen_lengths=t(2, 3, 4), rejected_lengths=t(3, 2, 5))


@pytest.mark.parametrize("method", [name for name, spec in METHODS.items() if spec.paired])
def test_raising_chosen_logp_lowers_every_pair_loss(method):
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    loss, _ = preference_loss(method, pc, pr, RC, RR, **PAIR_INPUTS)
    loss.backward()
    assert torch.all(pc.grad < 0), pc.grad
    assert torch.all(pr.grad > 0), pr.grad


def test_kto_gradient_signs():
    ex = kto_example()
    ex["policy_desirable_logps"].requires_grad_(True)
    ex["policy_undesirable_logps"].requires_grad_(True)
    kto_loss(**ex)[0].backward()
    assert torch.all(ex["policy_desirable_logps"].grad < 0)
    assert torch.all(ex["policy_undesirable_logps"].grad > 0)


def test_methods_table_matches_the_functions():
    for name, spec in METHODS.items():
        params = inspect.signature(spec.fn).parameters
        defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty
                    and not k.startswith("kl_")}
        assert defaults == spec.defaults, name
        assert ("rc" in params or "ref_desirable_logps" in params) == spec.needs_reference, name
        assert ("chosen_lengths" in params) == spec.needs_lengths, name
        assert spec.formula and spec.paper and "20" in spec.paper
    assert METHODS["simpo"].defaults["beta"] == 2.0 and METHODS["simpo"].defaults["simpo_gamma"] == 0.5
    assert not METHODS["kto"].paired and not METHODS["orpo"].needs_reference


def test_bad_method_and_options_are_user_errors():
    with pytest.raises(PrefcliError, match="unknown pair preference method 'dpoo'") as e:
        preference_loss("dpoo", PC, PR, RC, RR)
    assert "dpo" in e.value.hint
    with pytest.raises(PrefcliError, match="'kto'") as e:
        preference_loss("kto", PC, PR, RC, RR)
    assert "kto_loss" in e.value.hint
    with pytest.raises(PrefcliError, match="option 'label_smoothing' does not apply to method 'hinge'"):
        preference_loss("hinge", PC, PR, RC, RR, label_smoothing=0.1)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss("dpo", PC, PR)
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss("simpo", PC, PR)


# ---- TRL's own losses on the same log-probabilities ------------------------------------------------

class _Accelerator:
    """Single-process stand-in: TRL's loss code only gathers (identity here) and reads the device."""

    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trainer(cls, **attrs):
    """A TRL trainer object without __init__ (which wants a model and a dataset): just what the loss reads."""
    trainer = object.__new__(cls)
    trainer.__dict__.update(accelerator=_Accelerator(), model=SimpleNamespace(training=True),
                            _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1, **attrs)
    return trainer


def _fake_model(per_token_logps: torch.Tensor):
    """Stands in for the fused-LM-head forward: TRL reads these four outputs."""
    out = SimpleNamespace(log_probs=per_token_logps, entropy=torch.zeros_like(per_token_logps),
                          mean_logits=torch.zeros_like(per_token_logps),
                          is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool))
    return lambda **kwargs: out


def _spread(logps, lengths, width):
    """Per-token log-probs [N, width - 1] summing to `logps`, each spread evenly over its completion tokens,
    and the completion mask [N, width] (token 0 is the prompt)."""
    per_token = torch.zeros(len(logps), width - 1)
    mask = torch.zeros(len(logps), width, dtype=torch.long)
    for i, (lp, n) in enumerate(zip(logps.tolist(), lengths.long().tolist())):
        per_token[i, :n] = lp / n
        mask[i, 1:1 + n] = 1
    return per_token, mask


def _random_pairs(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(n, generator=g) * 12 + 0.2) for _ in range(4)]
    lengths = [torch.randint(1, 8, (n,), generator=g).float() for _ in range(2)]
    return (*logps, *lengths)


def trl_dpo(loss_types, pc, pr, rc, rr, lc, lr, beta, label_smoothing=0.0, loss_weights=None):
    from trl import DPOTrainer

    width = int(max(lc.max(), lr.max())) + 1
    per_token, mask = _spread(torch.cat([pc, pr]), torch.cat([lc, lr]), width)
    trainer = _trainer(DPOTrainer, beta=beta, loss_types=loss_types, label_smoothing=label_smoothing,
                       loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=None,
                       f_divergence_type="reverse_kl", use_weighting=False, precompute_ref_logps=True,
                       aux_loss_enabled=False)
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = trainer._compute_loss(_fake_model(per_token), inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("method,trl_type,opts", [
    ("dpo", "sigmoid", {"beta": 0.1}),
    ("dpo", "sigmoid", {"beta": 0.7}),
    ("ipo", "ipo", {"beta": 0.1}),
    ("ipo", "ipo", {"beta": 2.0}),
    ("hinge", "hinge", {"beta": 0.3}),
    ("robust", "robust", {"beta": 0.1, "label_smoothing": 0.2}),
])
def test_reference_losses_match_trl_dpo_trainer(method, trl_type, opts):
    pytest.importorskip("trl")
    pc, pr, rc, rr, lc, lr = _random_pairs(seed=len(method) + int(10 * opts["beta"]))
    want, want_metrics = trl_dpo([trl_type], pc, pr, rc, rr, lc, lr, opts["beta"], opts.get("label_smoothing", 0.0))
    got, metrics = preference_loss(method, pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **opts)
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(want_metrics[key], abs=1e-5), key


def test_rpo_alpha_matches_trl_sigmoid_plus_sft():
    pytest.importorskip("trl")
    pc, pr, rc, rr, lc, lr = _random_pairs(seed=5)
    want, _ = trl_dpo(["sigmoid", "sft"], pc, pr, rc, rr, lc, lr, beta=0.1, loss_weights=[1.0, 0.4])
    got, _ = preference_loss("dpo", pc, pr, rc, rr, chosen_lengths=lc, rpo_alpha=0.4)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_dpo_label_smoothing_matches_trl_cpo_sigmoid():
    # TRL's DPOTrainer no longer smooths "sigmoid"; its CPO sigmoid loss still does, on pc - pr.
    # Fed the log-ratios (pc - rc, pr - rr) it is exactly cDPO.
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    pc, pr, rc, rr, _, _ = _random_pairs(seed=6)
    cpo = _trainer(CPOTrainer, beta=0.2, label_smoothing=0.15, loss_type="sigmoid", alpha=0.0)
    want, _, _ = cpo.cpo_loss(pc - rc, pr - rr)
    got, _ = preference_loss("dpo", pc, pr, rc, rr, beta=0.2, label_smoothing=0.15)
    assert got.item() == pytest.approx(want.mean().item(), abs=1e-6)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    pc, pr, _, _, lc, lr = _random_pairs(seed=7)
    cpo = _trainer(CPOTrainer, beta=beta, label_smoothing=0.0, loss_type="simpo", simpo_gamma=gamma, alpha=0.0)
    want, want_c, want_r = cpo.cpo_loss(pc / lc, pr / lr)  # CPO is handed per-token averages for simpo
    got, m = preference_loss("simpo", pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=beta, simpo_gamma=gamma)
    assert got.item() == pytest.approx(want.mean().item(), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(want_c.mean().item(), abs=1e-5)
    assert m["rewards/rejected"].item() == pytest.approx(want_r.mean().item(), abs=1e-5)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_orpo_matches_trl_orpo():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    pc, pr, _, _, lc, lr = _random_pairs(seed=8)
    orpo = _trainer(ORPOTrainer, beta=0.25)
    ratio_losses, want_c, _, want_ratio, want_log_odds = orpo.odds_ratio_loss(pc / lc, pr / lr)
    # TRL: loss = nll - mean(beta * log sig(log odds ratio)); its nll is cross-entropy over the
    # chosen tokens of the batch, i.e. -sum(pc) / sum(lc)
    want = -pc.sum() / lc.sum() - ratio_losses.mean()
    got, m = preference_loss("orpo", pc, pr, chosen_lengths=lc, rejected_lengths=lr, beta=0.25)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    assert m["log_odds_ratio"].item() == pytest.approx(want_ratio.item(), abs=1e-5)
    assert m["log_odds_chosen"].item() == pytest.approx(want_log_odds.item(), abs=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(want_c.mean().item(), abs=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_matches_trl_kto_trainer(weights):
    pytest.importorskip("trl")
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(9)
    label = torch.tensor([True, False, True, True, False, False, True])
    n, width = len(label), 4
    policy, ref = -(torch.rand(n, generator=g) * 8 + 0.5), -(torch.rand(n, generator=g) * 8 + 0.5)
    kl_policy, kl_ref = -(torch.rand(n, generator=g) * 8 + 0.5), -(torch.rand(n, generator=g) * 8 + 0.5)
    kl_ref = kl_ref - 1.0  # keep z > 0, so the clamp is not what makes the two agree
    # the fake model returns row i's log-prob for a row starting with token i (KL rows start at n + i)
    ids = torch.zeros(n, width, dtype=torch.long)
    ids[:, 0] = torch.arange(n)
    kl_ids = ids.clone()
    kl_ids[:, 0] += n
    table = torch.cat([policy, kl_policy])

    def model(input_ids, **kwargs):
        per_token = torch.zeros(len(input_ids), width - 1)
        per_token[:, 0] = table[input_ids[:, 0]]
        return SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                               mean_logits=torch.zeros_like(per_token))

    trainer = _trainer(KTOTrainer, beta=0.1, loss_type="kto", calculate_KL=True, precompute_ref_logps=True,
                       aux_loss_enabled=False, desirable_weight=weights[0], undesirable_weight=weights[1])
    mask = torch.ones(n, width, dtype=torch.long)
    batch = {"label": label, "input_ids": ids, "attention_mask": mask, "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": mask, "KL_completion_mask": mask,
             "ref_logps": ref, "ref_KL_logps": kl_ref}
    want = trainer._compute_loss(model, batch, False)
    got, m = kto_loss(policy[label], policy[~label], ref[label], ref[~label], kl_policy, kl_ref, beta=0.1,
                      desirable_weight=weights[0], undesirable_weight=weights[1])
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert m[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key
