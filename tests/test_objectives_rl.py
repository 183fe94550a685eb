"""Online-RL math checked against numbers worked out by hand (comments show the arithmetic)."""

import math

import pytest
import torch

from prefcli.objectives import rl

NAN = float("nan")


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def m(x):
    return torch.tensor(x, dtype=torch.bool)


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), t(b), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_padding_even_nan():
    x = t([[1.0, 2.0, NAN], [4.0, 99.0, float("inf")]])
    mask = m([[1, 1, 0], [1, 0, 0]])
    close(rl.masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    close(rl.masked_mean(x, mask, dim=1), [1.5, 4.0])  # (1+2)/2, 4/1
    close(rl.masked_mean(x, torch.zeros(2, 3, dtype=torch.bool)), 0.0)  # empty mask: 0, not NaN


def test_masked_var():
    x = t([[1.0, 2.0], [4.0, 100.0]])
    mask = m([[1, 1], [1, 0]])
    # real 1, 2, 4: mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    close(rl.masked_var(x, mask, unbiased=False), 42 / 9 / 3)  # 14/9
    close(rl.masked_var(x, mask), 42 / 9 / 2)  # Bessel: 7/3
    with pytest.raises(ValueError, match="at least 2"):
        rl.masked_var(x, m([[1, 0], [0, 0]]))


def test_whiten():
    x = t([[1.0, 3.0, 50.0], [5.0, NAN, 7.0]])
    mask = m([[1, 1, 0], [1, 0, 0]])
    # real 1, 3, 5: mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    close(rl.whiten(x, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # shift_mean=False adds the mean 3 back; padding stays 0
    close(rl.whiten(x, mask, shift_mean=False), [[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]])


def test_entropy_from_logits():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -math.inf, -math.inf], [1000.0, 0.0, -math.inf, -math.inf]]])
    # uniform over 4: ln 4 = 1.3862944
    # p = [1/4, 3/4]: -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - 3/4 ln 3 = 1.3862944 - 0.8239592 = 0.5623351
    # p = [1, e^-1000]: 0 (and -inf logits add 0, not NaN)
    out = rl.entropy_from_logits(logits)
    assert out.shape == (1, 3)
    close(out, [[1.3862944, 0.5623351, 0.0]])


# ---------------------------------------------------------------- rewards and KL


def test_place_rewards_last_real_token_ragged():
    scores = t([1.0, 2.0, 3.0])
    mask = m([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    close(rl.place_rewards(scores, mask), [[0, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 3]])
    # float masks work the same
    close(rl.place_rewards(scores, mask.double()), [[0, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 3]])


def test_place_rewards_empty_row_is_an_error():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        rl.place_rewards(t([1.0, 2.0]), m([[1, 0], [0, 0]]))


def test_kl_penalty_k1_k3():
    logp = t([-1.0, -2.0, -0.7])
    ref = t([-1.5, -1.0, -0.7])
    close(rl.kl_penalty(logp, ref, "k1"), [0.5, -1.0, 0.0])  # logp - ref
    # d = ref - logp = -0.5, 1, 0: e^-0.5 + 0.5 - 1 = 0.1065307; e - 1 - 1 = 0.7182818; 1 - 0 - 1 = 0
    close(rl.kl_penalty(logp, ref, "k3"), [0.1065307, 0.7182818, 0.0])
    with pytest.raises(ValueError):
        rl.kl_penalty(logp, ref, "k9")


def test_ppo_rewards():
    scores = t([2.0, -1.0])
    logp = t([[-1.0, -2.0, -0.5], [-1.0, NAN, 9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0]])
    mask = m([[1, 1, 1], [1, 0, 0]])
    # k1 = [[0.5, -1, 0], [1, pad, pad]]; -0.1 * k1 = [[-0.05, 0.1, 0], [-0.1, 0, 0]]
    # plus the score on the last real token: row 0 t=2 gets +2, row 1 t=0 gets -1
    close(rl.ppo_rewards(scores, logp, ref, mask, kl_coef=0.1), [[-0.05, 0.1, 2.0], [-1.1, 0.0, 0.0]])


def test_truncation_penalty_subtracts_from_unfinished():
    scores = t([1.0, 2.0, -1.0])
    finished = m([1, 0, 0])
    close(rl.truncation_penalty(scores, finished, 0.5), [1.0, 1.5, -1.5])  # 2 - 0.5, -1 - 0.5
    with pytest.raises(ValueError):
        rl.truncation_penalty(scores, finished, -1.0)


# ---------------------------------------------------------------- GAE


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    rewards = t([[1.0, 0.0, 2.0, 5.0], [0.0, 3.0, 5.0, 5.0]])
    values = t([[0.5, 1.0, 1.5, 7.0], [2.0, 1.0, 7.0, 7.0]])
    mask = m([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0 reward-to-go 1+0+2=3, 0+2=2, 2; minus V 0.5, 1, 1.5 -> 2.5, 1, 0.5
    # row 1 reward-to-go 3, 3; minus V 2, 1 -> 1, 2
    close(adv, [[2.5, 1.0, 0.5, 0.0], [1.0, 2.0, 0.0, 0.0]])
    close(ret, [[3.0, 2.0, 2.0, 0.0], [3.0, 3.0, 0.0, 0.0]])  # returns = A + V = reward-to-go


def test_gae_discounted():
    rewards = t([[0.0, 1.0, 100.0]])
    values = t([[0.5, 0.2, 100.0]])
    mask = m([[1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=1 (last real): delta = 1 + 0.9 * 0 - 0.2 = 0.8 (no bootstrap from padding); A1 = 0.8
    # t=0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32; A0 = -0.32 + 0.9 * 0.5 * 0.8 = 0.04
    close(adv, [[0.04, 0.8, 0.0]])
    close(ret, [[0.54, 1.0, 0.0]])  # A + V: 0.04 + 0.5, 0.8 + 0.2


def test_gae_padding_changes_nothing():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = m([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    adv, ret = rl.gae(rewards, values, mask)
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[~mask] = 1e6
    values2[~mask] = NAN
    adv2, ret2 = rl.gae(rewards2, values2, mask)
    torch.testing.assert_close(adv, adv2, atol=0, rtol=0)
    torch.testing.assert_close(ret, ret2, atol=0, rtol=0)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


# ---------------------------------------------------------------- PPO losses


def _ratio_logps(ratios):
    """logp, old_logp whose exp-difference is exactly `ratios` (old = 0)."""
    logp = t(ratios).log().requires_grad_()
    return logp, torch.zeros_like(logp)


def test_ppo_policy_loss_and_clipfrac():
    logp, old = _ratio_logps([[1.5, 0.9, 0.5], [1.1, 1.5, 1.0]])
    adv = t([[1.0, 1.0, -1.0], [-1.0, -1.0, 5.0]])
    mask = m([[1, 1, 1], [1, 1, 0]])
    loss, metrics = rl.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5 A=1:  max(-1.5, -1.2) = -1.2  clipped
    #   r=0.9 A=1:  max(-0.9, -0.9) = -0.9
    #   r=0.5 A=-1: max(0.5, 0.8)   =  0.8  clipped
    #   r=1.1 A=-1: max(1.1, 1.1)   =  1.1
    #   r=1.5 A=-1: max(1.5, 1.2)   =  1.5  (pessimistic: unclipped, not counted)
    # mean = (-1.2 - 0.9 + 0.8 + 1.1 + 1.5) / 5 = 1.3 / 5 = 0.26; clipfrac 2/5
    close(loss, 0.26)
    close(metrics["clipfrac"], 0.4)
    # approx_kl = 0.5 * mean(ln r)^2: (0.1644020 + 0.0111008 + 0.4804530 + 0.0090840 + 0.1644020) / 5 / 2
    close(metrics["approx_kl"], 0.0829442)
    loss.backward()
    # d/dlogp of -A r / 5 = -A r / 5 on unclipped tokens, 0 on clipped ones and padding
    close(logp.grad, [[0.0, -0.18, 0.0], [0.22, 0.3, 0.0]])


def test_ppo_policy_loss_padding_changes_nothing():
    logp, old = _ratio_logps([[1.5, 0.9, 7.0]])
    mask = m([[1, 1, 0]])
    loss, _ = rl.ppo_policy_loss(logp, old, t([[1.0, 1.0, 1.0]]), mask)
    with torch.no_grad():
        logp2 = logp.detach().clone()
        logp2[0, 2] = NAN
    loss2, metrics2 = rl.ppo_policy_loss(logp2, old, t([[1.0, 1.0, NAN]]), mask)
    close(loss, (-1.2 - 0.9) / 2)
    close(loss2, (-1.2 - 0.9) / 2)
    close(metrics2["clipfrac"], 0.5)


def test_ppo_value_loss():
    values = t([[0.5, 0.5, 0.1, -0.5, 40.0]]).requires_grad_()
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 0.0, 0.0, -0.5, NAN]])
    mask = m([[1, 1, 1, 1, 0]])
    loss, metrics = rl.ppo_value_loss(values, old, returns, mask, clip=0.2)
    # V_clip = clip(V, -0.2, 0.2) = 0.2, 0.2, 0.1, -0.2
    #   (0.5-1)^2 = 0.25   vs (0.2-1)^2 = 0.64      -> 0.64  clipped
    #   (0.5-0)^2 = 0.25   vs (0.2-0)^2 = 0.04      -> 0.25
    #   (0.1-0)^2 = 0.01   vs (0.1-0)^2 = 0.01      -> 0.01  (tie: not clipped)
    #   (-0.5+0.5)^2 = 0   vs (-0.2+0.5)^2 = 0.09   -> 0.09  clipped
    # 0.5 * (0.64 + 0.25 + 0.01 + 0.09) / 4 = 0.5 * 0.2475 = 0.12375
    close(loss, 0.12375)
    close(metrics["vf_clipfrac"], 0.5)
    loss.backward()
    # only unclipped maxima carry gradient: d/dV 0.5 * (V-R)^2 / 4 = (V - R) / 4
    close(values.grad, [[0.0, 0.125, 0.025, 0.0, 0.0]])


def test_kl_controllers_move_the_right_way():
    ctl = rl.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9 above target 6: error 9/6 - 1 = 0.5 -> clipped to 0.2; 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    close(ctl.update(9.0, n_steps=256), 0.201024)
    ctl = rl.AdaptiveKLController(0.2, 6.0, 10000)
    # KL 3 below target: error -0.5 -> -0.2; 0.2 * (1 - 0.00512) = 0.198976
    close(ctl.update(3.0, 256), 0.198976)
    ctl = rl.AdaptiveKLController(0.2, 6.0, 1000)
    # KL 6.6: error 0.1 (inside the clip); 0.2 * (1 + 0.1 * 100 / 1000) = 0.202; then again: 0.202 * 1.01 = 0.20402
    close(ctl.update(6.6, 100), 0.202)
    close(ctl.update(6.6, 100), 0.20402)
    assert ctl.value == pytest.approx(0.20402)
    fixed = rl.FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05 and fixed.value == 0.05


# ---------------------------------------------------------------- GRPO and RLOO


def test_grpo_advantages():
    scores = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 0: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1 -> (r - 2) / 1.0001
    # group 1: identical rewards -> 0
    close(rl.grpo_advantages(scores, 3), [-0.9999000, 0.0, 0.9999000, 0.0, 0.0, 0.0])
    close(rl.grpo_advantages(scores, 3, scale=False), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    # [0, 0, 0, 1]: mean 0.25, unbiased var (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5
    # -> -0.25 / 0.5001 = -0.4999000, 0.75 / 0.5001 = 1.4997001
    close(rl.grpo_advantages(t([0.0, 0.0, 0.0, 1.0]), 4), [-0.4999000, -0.4999000, -0.4999000, 1.4997001])


def test_group_shape_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        rl.grpo_advantages(t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 4)
    with pytest.raises(ValueError, match="at least 2"):
        rl.rloo_advantages(t([1.0, 2.0]), 1)


def test_rloo_advantages():
    # [1, 2, 3]: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    # [4, 4, 1]: 4 - (4+1)/2 = 1.5, 1.5, 1 - (4+4)/2 = -3
    close(rl.rloo_advantages(t([1.0, 2.0, 3.0, 4.0, 4.0, 1.0]), 3), [-1.5, 0.0, 1.5, 1.5, 1.5, -3.0])


def test_reinforce_loss_sequence_level():
    logp = t([[-1.0, -2.0, NAN], [-0.5, -0.5, -1.0]]).requires_grad_()
    mask = m([[1, 1, 0], [1, 1, 1]])
    adv = t([2.0, -1.0])
    loss = rl.reinforce_loss(logp, adv, mask)
    # sequence log-probs -3, -2; loss = -mean(2 * -3, -1 * -2) = -mean(-6, 2) = 2
    close(loss, 2.0)
    loss.backward()
    # d/dlogp = -A_i / B on every real token: -1 for row 0, +0.5 for row 1; padding 0
    close(logp.grad, [[-1.0, -1.0, 0.0], [0.5, 0.5, 0.5]])


def _grpo_case():
    logp, old = _ratio_logps([[1.5, 1.0, 0.8], [0.5, 3.0, 3.0]])
    with torch.no_grad():
        logp[1, 1:] = NAN  # padding
    adv = t([1.0, -1.0])
    mask = m([[1, 1, 1], [1, 0, 0]])
    return logp, old, adv, mask


def test_grpo_loss_normalisations_and_clipfrac():
    logp, old, adv, mask = _grpo_case()
    # row 0, A=1:  r=1.5: -min(1.5, 1.2) = -1.2 clipped; r=1: -1; r=0.8: -min(0.8, 0.8) = -0.8
    # row 1, A=-1: r=0.5: -min(-0.5, -0.8) = 0.8 clipped
    loss, metrics = rl.grpo_loss(logp, old, None, adv, mask, clip=0.2, norm="sequence")
    close(loss, (-3.0 / 3 + 0.8 / 1) / 2)  # per-reply means -1, 0.8 -> -0.1
    close(metrics["clipfrac"], 0.5)  # 2 of 4 real tokens
    assert "kl" not in metrics
    loss_tok, _ = rl.grpo_loss(logp, old, None, adv, mask, norm="token")
    close(loss_tok, (-3.0 + 0.8) / 4)  # -0.55
    loss_dr, _ = rl.grpo_loss(logp, old, None, adv, mask, norm="dr_grpo")
    close(loss_dr, (-3.0 + 0.8) / 6)  # B * T = 2 * 3
    with pytest.raises(ValueError):
        rl.grpo_loss(logp, old, None, adv, mask, norm="mean")


def test_grpo_loss_with_reference_kl():
    logp, old, adv, mask = _grpo_case()
    ref = logp.detach().clone()
    ref[0, 0] += math.log(2)  # d = ref - logp = ln 2 at one token, 0 elsewhere
    ref[1, 1:] = 123.0  # padding
    loss, metrics = rl.grpo_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.1)
    # k3 = 2 - ln 2 - 1 = 0.3068528 at row 0 t=0, 0 elsewhere; + 0.1 * k3 = 0.0306853
    # row 0 mean (-1.2 + 0.0306853 - 1 - 0.8) / 3 = -0.9897716; row 1: 0.8 -> (-0.9897716 + 0.8) / 2
    close(loss, -0.0948858)
    close(metrics["kl"], 0.3068528 / 4)  # token-mean k3 over 4 real tokens


def test_grpo_loss_on_policy_gradient():
    logp = t([[-1.0, -2.0, -0.5], [-1.0, NAN, NAN]]).requires_grad_()
    mask = m([[1, 1, 1], [1, 0, 0]])
    loss, metrics = rl.grpo_loss(logp, None, None, t([1.0, -1.0]), mask)
    # old = logp.detach(): ratio 1, loss per token -A -> reply means -1, +1 -> 0
    close(loss, 0.0)
    close(metrics["clipfrac"], 0.0)
    loss.backward()
    # d/dlogp = -A / len_i / B: row 0 -1/3/2 = -1/6, row 1 +1/1/2 = 0.5; padding 0
    close(logp.grad, [[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.0, 0.0]])
