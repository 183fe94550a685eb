"""lm.py and reward.py against numbers worked out by hand, transformers, and TRL when installed."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from prefcli.objectives.lm import lm_loss, sequence_logprobs, token_logprobs
from prefcli.objectives.reward import bradley_terry_loss

TOL = 1e-6


def hand_logits():
    """One row, V=3. Softmax of log(w) is w / sum(w), so every probability is a plain fraction.

    position 0: weights [1, 2, 1] -> p = [1/4, 1/2, 1/4]
    position 1: weights [1, 1, 6] -> p = [1/8, 1/8, 6/8]
    position 2: weights [3, 1, 1] -> predicts past the end; never counted
    """
    weights = torch.tensor([[[1.0, 2.0, 1.0], [1.0, 1.0, 6.0], [3.0, 1.0, 1.0]]])
    return weights.log(), torch.tensor([[0, 1, 2]])


def test_sequence_logprobs_by_hand():
    logits, ids = hand_logits()
    # all counted: logits[0] predicts ids[1]=1 -> log(1/2); logits[1] predicts ids[2]=2 -> log(6/8)
    total, count = sequence_logprobs(logits, ids)
    assert total.item() == pytest.approx(math.log(1 / 2) + math.log(6 / 8), abs=TOL)
    assert count.tolist() == [2]
    # mask aligned with ids: mask[1]=0 drops the prediction of ids[1]; mask[0] is never used
    total, count = sequence_logprobs(logits, ids, torch.tensor([[1, 0, 1]]))
    assert total.item() == pytest.approx(math.log(6 / 8), abs=TOL)
    assert count.tolist() == [1]
    assert total.dtype == torch.float32 and count.dtype == torch.int64


def test_token_logprobs_has_no_shift():
    logits, _ = hand_logits()
    # target at each position is read from that same position's distribution
    got = token_logprobs(logits, torch.tensor([[1, 2, 0]]))
    expected = [math.log(1 / 2), math.log(6 / 8), math.log(3 / 5)]
    assert got[0].tolist() == pytest.approx(expected, abs=TOL)


def test_half_precision_logits_match_float32_on_the_same_values():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11).to(torch.bfloat16)
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 0, 1, 1]])
    got = sequence_logprobs(logits, ids, mask)
    want = sequence_logprobs(logits.float(), ids, mask)
    assert got[0].dtype == torch.float32
    assert torch.allclose(got[0], want[0], atol=1e-6)
    assert torch.equal(got[1], want[1])


def test_lm_loss_by_hand_and_against_transformers():
    logits, ids = hand_logits()
    loss, n = lm_loss(logits, ids)
    # mean over the two counted tokens of -log p
    assert loss.item() == pytest.approx(-(math.log(1 / 2) + math.log(6 / 8)) / 2, abs=TOL)
    assert n.item() == 2

    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(1)
    logits = torch.randn(3, 6, 13)
    ids = torch.randint(0, 13, (3, 6))
    mask = (torch.rand(3, 6) > 0.3).long()
    loss, n = lm_loss(logits, ids, mask)
    labels = ids.masked_fill(mask == 0, -100)
    assert loss.item() == pytest.approx(ForCausalLMLoss(logits, labels, vocab_size=13).item(), abs=1e-5)
    assert n.item() == mask[:, 1:].sum().item()


def test_lm_loss_token_weighted_across_rows():
    # row 0 counts 2 tokens, row 1 counts 1: the mean is over the 3 tokens, not over the 2 rows
    logits, ids = hand_logits()
    logits, ids = logits.repeat(2, 1, 1), ids.repeat(2, 1)
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]])
    loss, n = lm_loss(logits, ids, mask)
    expected = -(math.log(1 / 2) + math.log(6 / 8) + math.log(6 / 8)) / 3
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert n.item() == 3


def test_lm_loss_with_no_counted_token_is_zero_and_differentiable():
    logits, ids = hand_logits()
    logits.requires_grad_(True)
    loss, n = lm_loss(logits, ids, torch.zeros_like(ids))
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0
    assert torch.all(logits.grad == 0)


def test_lm_loss_gradient_raises_the_target_logit():
    logits, ids = hand_logits()
    logits.requires_grad_(True)
    lm_loss(logits, ids)[0].backward()
    # descending the loss raises the logit of the token that came next
    assert logits.grad[0, 0, 1] < 0 and logits.grad[0, 1, 2] < 0
    assert torch.all(logits.grad[0, 2] == 0)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_sequence_logprobs_against_trl_get_batch_logps():
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    torch.manual_seed(2)
    logits = torch.randn(4, 7, 17)
    ids = torch.randint(0, 17, (4, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    total, count = sequence_logprobs(logits, ids, mask)
    assert torch.allclose(total, CPOTrainer.get_batch_logps(logits, labels.clone()), atol=1e-5)
    assert torch.allclose(total / count, CPOTrainer.get_batch_logps(logits, labels.clone(), True), atol=1e-5)


# ---- reward.py --------------------------------------------------------------------------------

def softplus(x):
    """-log sigmoid(-x) = log(1 + e^x), written out."""
    return math.log(1 + math.exp(x))


def test_bradley_terry_by_hand():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    loss, m = bradley_terry_loss(rc, rr)
    # diffs [1, -1]: -log sig(1) = log(1 + e^-1), -log sig(-1) = log(1 + e^1)
    assert loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2, abs=TOL)
    assert m["accuracy"].item() == 0.5
    assert m["margin"].item() == pytest.approx(0.0, abs=TOL)
    assert m["rewards/chosen"].item() == pytest.approx(1.25, abs=TOL)  # (2 + 0.5) / 2
    assert m["rewards/rejected"].item() == pytest.approx(1.25, abs=TOL)  # (1 + 1.5) / 2
    assert m["loss"].item() == pytest.approx(loss.item(), abs=TOL)


def test_bradley_terry_margin_and_centering_by_hand():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    loss, m = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.0]), center_coef=0.01)
    # logits [1 - 0.5, -1 - 0] = [0.5, -1]; centering 0.01 * mean((2+1)^2, (0.5+1.5)^2) = 0.01 * (9+4)/2 = 0.065
    expected = (softplus(-0.5) + softplus(1)) / 2 + 0.065
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert m["margin"].item() == pytest.approx(0.0, abs=TOL)  # metric margin is r_c - r_r, not the target
    # a float margin means the same margin for every pair: logits [0.75, -1.25]
    loss, _ = bradley_terry_loss(rc, rr, margin=0.25)
    assert loss.item() == pytest.approx((softplus(-0.75) + softplus(1.25)) / 2, abs=TOL)


def test_bradley_terry_gradient_sign():
    rc = torch.tensor([0.3, -0.2], requires_grad=True)
    rr = torch.tensor([0.1, 0.4], requires_grad=True)
    bradley_terry_loss(rc, rr)[0].backward()
    assert torch.all(rc.grad < 0) and torch.all(rr.grad > 0)


@pytest.mark.parametrize("margin,center", [(None, None), (torch.tensor([0.5, -0.2, 1.0, 0.0]), 0.01)])
def test_bradley_terry_against_trl_reward_trainer(margin, center):
    pytest.importorskip("trl")
    from trl import RewardTrainer

    rc = torch.tensor([1.2, -0.3, 0.7, 2.0])
    rr = torch.tensor([0.4, 0.1, 0.9, -1.0])
    trainer = object.__new__(RewardTrainer)  # the loss needs only these attributes, no model
    trainer.__dict__.update(
        model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"attention_mask": torch.ones(8, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    scores = SimpleNamespace(logits=torch.cat([rc, rr]).unsqueeze(-1))
    want = trainer.compute_loss(lambda **kw: scores, inputs)
    got, m = bradley_terry_loss(rc, rr, margin=margin, center_coef=center or 0.0)
    assert got.item() == pytest.approx(want.item(), abs=TOL)
    assert m["accuracy"].item() == pytest.approx(trainer._metrics["train"]["accuracy"][-1], abs=TOL)
    assert m["margin"].item() == pytest.approx(trainer._metrics["train"]["margin"][-1], abs=TOL)


def test_cross_entropy_reference_is_what_lm_loss_means():
    # the definition in lm_loss's docstring, spelled with F.cross_entropy on pre-shifted tensors
    torch.manual_seed(3)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert lm_loss(logits, ids)[0].item() == pytest.approx(want.item(), abs=1e-6)
