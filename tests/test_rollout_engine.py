"""The fast paths of the sampling engine used for RL rollouts: inverse-CDF sampling, one prefill
per distinct prompt, finished rows leaving the cache in place, one-query decode attention."""

import pytest
import torch
import torch.nn.functional as F

import prefcli.model

from prefcli.generate import generate, inverse_cdf, sample_next, sample_rows
from prefcli.model import KVCache, one_query_attention
from test_generate import VOCAB, make_model, prompt  # the same tiny random model


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # never a token of probability 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# ----------------------------------------------------------------------------- sampling

def test_inverse_cdf_by_hand():
    # weights 1 and 3 at indices 1 and 3, zeros around and between: target (1 - u) * 4
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).repeat(5, 1)
    u = torch.tensor([[0.0], [0.5], [0.74], [0.76], [1 - 2 ** -53]], dtype=torch.float64)
    # u < 0.75: target above 1 -> index 3 (probability 3/4); u >= 0.75 -> index 1 (1/4).
    # The extremes land on the last and the first positive weight, never on a zero.
    assert inverse_cdf(weights, u).tolist() == [3, 3, 3, 1, 1]


@pytest.mark.parametrize("temperature, top_k, expected", [
    (1.0, 0, [0.5, 0.25, 0.15, 0.1, 0.0]),
    (0.5, 0, [0.25 / 0.345, 0.0625 / 0.345, 0.0225 / 0.345, 0.01 / 0.345, 0.0]),  # p^2, renormalised
    (1.0, 2, [2 / 3, 1 / 3, 0.0, 0.0, 0.0]),
])
def test_sampler_draws_the_right_frequencies(temperature, top_k, expected):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.log().repeat(100_000, 1)  # the zero becomes -inf: a filtered-out token
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, temperature, top_k=top_k, generator=g)
    counts = torch.bincount(ids, minlength=5).double()
    # 99.9% quantile of chi-square with 3 (or 1) degrees of freedom: 16.27 (10.83)
    assert chi_square(counts, torch.tensor(expected, dtype=torch.float64)) < (16.27 if top_k == 0 else 10.83)


def test_sample_rows_takes_unnormalised_weights_and_is_repeatable():
    weights = torch.tensor([[2.0, 0.0, 6.0]]).repeat(40_000, 1)
    a = sample_rows(weights, torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_rows(weights, torch.Generator().manual_seed(1)))
    assert chi_square(torch.bincount(a, minlength=3).double(), torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64)) < 10.83


def test_generated_first_tokens_follow_the_model_distribution():
    # 4000 samples of one prompt: one prefill, 4000 cache rows, one draw each.
    model = make_model()
    p = prompt(5, 1)
    out = generate(model, [p] * 4000, max_new_tokens=1, temperature=1.0, seed=0)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([p]))[0, -1].double(), -1)
    counts = torch.bincount(torch.tensor([c.tokens[0] for c in out]), minlength=VOCAB).double()
    # Pool the rare tokens (expected count < 5) into one cell, as a chi-square test needs.
    rare = probs * 4000 < 5
    counts = torch.cat([counts[~rare], counts[rare].sum()[None]])
    probs = torch.cat([probs[~rare], probs[rare].sum()[None]])
    assert (probs > 0.05).sum() >= 3  # a distribution with several likely tokens, not a near-argmax
    assert len(probs) == 45 and chi_square(counts, probs) < 78.75  # 99.9% quantile of chi-square, 44 d.o.f.


# ----------------------------------------------------------------------------- rows finishing at different times

def test_rows_finishing_at_different_times_equal_each_prompt_alone():
    model = make_model(seed=3)
    prompts = [prompt(n, seed=10 + n) for n in (4, 7, 2, 9, 5, 3)]
    free = generate(model, prompts, max_new_tokens=12, temperature=0)
    stop = [free[0].tokens[1], free[2].tokens[4], free[4].tokens[7]]
    stream = []
    out = generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids=stop,
                   on_token=lambda row, tok: stream.append((row, tok)))
    lengths = [len(c.tokens) for c in out]
    assert len(set(lengths)) >= 4 and 12 in lengths  # several finish times, some rows run to the end
    for p, c in zip(prompts, out):
        (alone,) = generate(model, [p], max_new_tokens=12, temperature=0, stop_ids=stop)
        assert c.tokens == alone.tokens and c.finished == alone.finished
        assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert c.finished == (c.tokens[-1] in stop) and len(c.logprobs) == len(c.tokens)
    # Streamed step by step, rows in order within a step.
    assert stream == [(r, c.tokens[s]) for s in range(12) for r, c in enumerate(out) if s < len(c.tokens)]


def test_sampled_logprobs_match_a_full_forward_pass(monkeypatch):
    model = make_model(seed=1)
    # Repeats, left padding, and 24 rows x 4 heads: the one-query attention path while decoding.
    prompts = [prompt(3, 1)] * 10 + [prompt(6, 2)] * 10 + [prompt(1, 3)] * 4
    calls = []
    monkeypatch.setattr(prefcli.model, "one_query_attention",
                        lambda *a: calls.append(a[0].shape[0]) or one_query_attention(*a))
    out = generate(model, prompts, max_new_tokens=10, temperature=1.0, stop_ids=list(range(5, 15)), seed=4)
    assert calls and calls[0] >= 16
    assert len({len(c.tokens) for c in out}) > 2
    with torch.no_grad():
        for p, c in zip(prompts, out):
            logits = model(torch.tensor([p + c.tokens]))[0, len(p) - 1:-1]
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
            assert c.logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_repeated_prompts_with_per_row_steering_are_not_merged():
    model = make_model(seed=2)
    p, q = prompt(4, 7), prompt(6, 8)
    offsets = 0.5 * torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    out = generate(model, [p, p, q], max_new_tokens=8, temperature=0, embed_offset=offsets)
    for ids, offset, c in zip([p, p, q], offsets, out):
        assert c.tokens == generate(model, [ids], max_new_tokens=8, temperature=0, embed_offset=offset)[0].tokens
    assert out[0].tokens != out[1].tokens  # the same prompt, steered apart
    shared = generate(model, [p, q, p], max_new_tokens=8, temperature=0, embed_offset=offsets[0])
    alone = generate(model, [p], max_new_tokens=8, temperature=0, embed_offset=offsets[0])[0].tokens
    assert shared[0].tokens == shared[2].tokens == alone


# ----------------------------------------------------------------------------- KV cache and attention

def test_keep_rows_moves_rows_in_place_and_decoding_continues():
    model = make_model()
    x = torch.randint(3, VOCAB, (5, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    mask[1, :4] = mask[4, :2] = 0
    step = torch.randint(3, VOCAB, (5, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full, part = KVCache.for_model(model, 5, 10), KVCache.for_model(model, 5, 10)
        model(x, attention_mask=mask, kv_cache=full)
        model(x, attention_mask=mask, kv_cache=part)
        expected = model(step, kv_cache=full)[:, -1]
        order = part.keep_rows([0, 2, 4])
        assert sorted(order) == [0, 2, 4] and order != [0, 2, 4]  # row 4 moved into the hole at 1
        assert part.batch_size == 3 and part.has_padding  # row 4 is padded
        got = model(step[order], kv_cache=part)[:, -1]
        assert (got - expected[order]).abs().max() <= 1e-5


def test_one_query_attention_equals_sdpa_with_gqa_and_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, t, 8, generator=g) for h, t in ((4, 1), (2, 7), (2, 7)))
    mask = torch.rand(3, 1, 1, 7, generator=g) > 0.3
    mask[..., -1] = True
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    assert (one_query_attention(q, k, v, mask) - expected).abs().max() <= 1e-6
    assert (one_query_attention(q, k, v, None) - F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))).abs().max() <= 1e-6
