"""Log-probs of taken tokens without full-vocabulary logits: equal values and gradients to the plain path."""

from __future__ import annotations

import pytest
import torch

from prefcli.model import ModelConfig, Transformer, chunked_lm_loss, chunked_reply_logprobs, chunked_sequence_logprobs
from prefcli.objectives.lm import lm_loss, selective_logprobs, sequence_logprobs, token_logprobs


def tiny(tied: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, tie_word_embeddings=tied))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_sequence_logprobs_match_values_and_gradients(tied):
    model = tiny(tied)
    ids = torch.randint(0, 301, (3, 21), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    attn[2, 15:] = 0  # a right-padded row
    mask = attn.clone()
    mask[:, :6] = 0  # prompt tokens do not count
    want, n = sequence_logprobs(model(ids, attention_mask=attn), ids, mask)
    (want * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    g_want = grads(model)
    model.zero_grad()
    got, n2 = chunked_sequence_logprobs(model, ids, attention_mask=attn, loss_mask=mask)
    (got * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert n.tolist() == n2.tolist() == [15, 15, 9]
    for name, g in grads(model).items():
        torch.testing.assert_close(g, g_want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_chunk_size_does_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    want = token_logprobs(hidden @ weight.T, targets)
    want.sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    for chunk in (1, 4, 7, 100):
        hidden.grad = weight.grad = None
        got = selective_logprobs(hidden, weight, targets, chunk_tokens=chunk)
        got.sum().backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden.grad, gh, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weight.grad, gw, atol=1e-5, rtol=1e-5)


def test_small_heads_take_one_plain_pass_with_the_same_values_and_gradients():
    from prefcli.objectives import lm

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (3, 5), generator=g)
    assert targets.numel() * 40 <= lm.DIRECT_LOGITS  # this call takes the plain pass
    plain = selective_logprobs(hidden, weight, targets)
    plain.sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = selective_logprobs(hidden, weight, targets, chunk_tokens=4)
    chunked.sum().backward()
    torch.testing.assert_close(plain, chunked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, gw, atol=1e-5, rtol=1e-5)


def test_chunked_lm_loss_equals_lm_loss_with_packed_documents():
    model = tiny(True)
    ids = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(2))
    docs = torch.tensor([[0] * 7 + [1] * 9, [0] * 16])
    mask = torch.ones_like(ids)
    mask[0, 7] = 0  # a document's first token is never a target
    want, n = lm_loss(model(ids, document_ids=docs), ids, mask)
    got, n2 = chunked_lm_loss(model, ids, document_ids=docs, loss_mask=mask)
    assert int(n) == int(n2) == 29
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chunked_reply_logprobs_match_the_full_logits():
    model = tiny(False)
    ids = torch.randint(0, 301, (2, 12), generator=torch.Generator().manual_seed(3))
    full = torch.log_softmax(model(ids).float(), -1)[:, 4:-1].gather(-1, ids[:, 5:, None]).squeeze(-1)
    torch.testing.assert_close(chunked_reply_logprobs(model, ids, None, 5), full, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_logprobs_are_close_and_float32():
    model = tiny(False)
    ids = torch.randint(0, 301, (2, 12), generator=torch.Generator().manual_seed(4))
    want, _ = chunked_sequence_logprobs(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = chunked_sequence_logprobs(model, ids)
    got.sum().backward()  # the backward runs in bf16 too, without dtype errors
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.5, rtol=0.02)
