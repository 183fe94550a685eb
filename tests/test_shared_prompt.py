"""One row per preference pair (prompt once, then both replies): the same log-probs and gradients
as scoring prompt + chosen and prompt + rejected as two rows."""

from __future__ import annotations

import pytest
import torch

from prefcli import lora
from prefcli.data.examples import Encoded, pad_batch, pad_shared_prompt, shares_prompt
from prefcli.model import ModelConfig, Transformer, chunked_sequence_logprobs, shared_prompt_logprobs

V = 89


def tiny(seed: int, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)
    return Transformer(ModelConfig(**{**cfg, **kw}))


def random_pairs(seed: int, shapes) -> list[tuple[Encoded, Encoded]]:
    """(prompt, chosen, rejected) lengths -> pairs; the replies' last token is not a target
    (as a chat template's trailing newline after end-of-turn)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for p, c, r in shapes:
        prompt = torch.randint(1, V, (p,), generator=g).tolist()

        def enc(n):
            reply = torch.randint(1, V, (n,), generator=g).tolist()
            return Encoded(prompt + reply, [0] * p + [1] * (n - 1) + [0 if n > 2 else 1], p)

        pairs.append((enc(c), enc(r)))
    return pairs


SHAPES = [(5, 7, 3), (3, 1, 9), (9, 4, 1), (1, 6, 6), (12, 2, 2)]  # 1-token replies, a 1-token prompt


def two_rows(model, pairs):
    """The plain path: chosen rows then rejected rows, right-padded, one forward."""
    b = pad_batch([a for a, _ in pairs] + [r for _, r in pairs], 0)
    lp, n = chunked_sequence_logprobs(model, b["input_ids"], attention_mask=b["attention_mask"], loss_mask=b["loss_mask"])
    k = len(pairs)
    return lp[:k], lp[k:], n[:k], n[k:]


def shared(model, pairs):
    b = pad_shared_prompt(pairs, 0)
    sums, counts = shared_prompt_logprobs(model, b["input_ids"], b["loss_mask"], b["prompt_lengths"], b["splits"],
                                          b["lengths"])
    sums, counts = sums.flatten(), counts.flatten()
    return sums[b["first"]], sums[b["second"]], counts[b["first"]], counts[b["second"]]


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def compare(model, pairs, atol=1e-5, grad_atol=1e-5):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2, len(pairs), generator=g)
    results = []
    for fn in (two_rows, shared):
        model.zero_grad()
        pc, pr, nc, nr = fn(model, pairs)
        ((pc * w[0]).sum() + (pr * w[1]).sum()).backward()
        results.append((pc.detach(), pr.detach(), nc, nr, grads(model)))
    (wc, wr, wnc, wnr, wg), (gc, gr, gnc, gnr, gg) = results
    assert gnc.tolist() == wnc.tolist() and gnr.tolist() == wnr.tolist()
    torch.testing.assert_close(gc, wc, atol=atol, rtol=1e-5)
    torch.testing.assert_close(gr, wr, atol=atol, rtol=1e-5)
    assert wg.keys() == gg.keys() and wg
    for name, grad in wg.items():
        torch.testing.assert_close(gg[name], grad, atol=grad_atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_prompt_equals_two_rows_values_and_gradients(seed):
    g = torch.Generator().manual_seed(100 + seed)
    shapes = SHAPES + [tuple(int(x) for x in torch.randint(1, 14, (3,), generator=g)) for _ in range(4)]
    compare(tiny(seed), random_pairs(seed, shapes))


def test_untied_gqa_and_qkv_bias():
    model = tiny(3, tie_word_embeddings=False, num_key_value_heads=2, attention_bias=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    compare(model, random_pairs(3, SHAPES))


def test_pairs_that_do_not_share_their_prompt_take_two_rows():
    pairs = random_pairs(4, SHAPES[:3])
    a, b = pairs[1]
    truncated = Encoded(b.ids[1:], b.mask[1:], b.prompt_len - 1)  # the prompt lost its first token
    pairs[1] = (a, truncated)
    assert not shares_prompt(a, truncated) and shares_prompt(*pairs[0])
    batch = pad_shared_prompt(pairs, 0)
    assert len(batch["input_ids"]) == 4  # two shared rows, the odd pair in two rows of its own
    assert batch["first"].tolist() == [0, 2, 6] and batch["second"].tolist() == [1, 4, 7]
    compare(tiny(4), pairs)


def test_the_layout_of_a_shared_row():
    (a, b), = random_pairs(5, [(3, 2, 4)])
    batch = pad_shared_prompt([(a, b)], 0)
    assert batch["input_ids"][0].tolist() == a.ids + b.ids[3:]
    assert (batch["prompt_lengths"].item(), batch["splits"].item(), batch["lengths"].item()) == (3, 5, 9)
    from prefcli.model import shared_prompt_layout

    pos, mask, prev = shared_prompt_layout(batch["prompt_lengths"], batch["splits"], batch["lengths"], 9)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    assert prev[0].tolist() == [-1, 0, 1, 2, 3, 2, 5, 6, 7]  # the first rejected token from the prompt's last state
    assert mask[0, 5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0]  # rejected sees the prompt, not chosen
    assert mask[0, 4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]


def test_with_lora_adapters_gradients_reach_the_adapters_alike():
    model = tiny(6, tie_word_embeddings=False)
    lora.add_adapters(model, lora.LoraSpec(rank=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if "lora_B" in m._modules:
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    compare(model, random_pairs(6, SHAPES))
    assert any("lora_A" in name for name, p in model.named_parameters() if p.grad is not None)


def test_under_bf16_autocast_close_to_two_rows():
    model = tiny(7)
    pairs = random_pairs(7, SHAPES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = two_rows(model, pairs)
        got = shared(model, pairs)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), atol=0.05 * float(w.detach().abs().max()) + 1e-3, rtol=0.02)


def test_the_rule_shares_long_prompts_and_not_short_prompts_before_long_replies():
    from prefcli.inference import pair_logprobs, worth_sharing
    from prefcli.model import make_config

    small = make_config("small", 2048)
    pairs = random_pairs(8, [(14, 11, 21), (300, 70, 60), (3, 230, 235), (24, 250, 260)])
    assert worth_sharing(pairs, small) == [True, True, False, False]
    # Mixed flags in one batch: the shared pairs take one row, the others two; values as two rows.
    model = tiny(8)
    pairs = random_pairs(9, SHAPES)
    want = two_rows(model, pairs)
    got, n = pair_logprobs(model, pairs, 0, "cpu", groups=2, shared=[True, False, True, False, True])
    torch.testing.assert_close(got, torch.stack(want[:2]).detach(), atol=1e-5, rtol=1e-5)
    assert n.tolist() == torch.stack(want[2:]).tolist()
