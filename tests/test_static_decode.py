"""The fixed-shape decode step (CUDA graphs on a GPU) computes what the dynamic decode step does."""

import torch

from prefcli.generate import generate
from prefcli.model import KVCache, Transformer, fused_projections, make_config
from prefcli.static_decode import StaticDecoder


def tiny(kv_heads=None, seed=0):
    torch.manual_seed(seed)
    cfg = make_config("tiny", 97, layers=2, dim=32, heads=4, context=64)
    if kv_heads:
        cfg.num_key_value_heads = kv_heads
    model = Transformer(cfg).eval()
    for p in model.parameters():  # larger weights than the init: logits that differ clearly between tokens
        p.data.normal_(0, 0.3)
    return model


def test_static_step_logits_equal_dynamic_step_with_padding_and_gqa():
    model = tiny(kv_heads=2)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode(), fused_projections(model):
        dyn, sta = KVCache.for_model(model, 2, 12), KVCache.for_model(model, 2, 12)
        model(ids, attention_mask=mask, kv_cache=dyn)
        model(ids, attention_mask=mask, kv_cache=sta)
        decoder = StaticDecoder(model, sta, graph=False)
        for token in ([8, 9], [10, 11], [12, 13]):
            nxt = torch.tensor(token)
            want = model(nxt[:, None], kv_cache=dyn)[:, -1]
            got = decoder(nxt)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert sta.length == dyn.length and torch.equal(sta.seen, dyn.seen)


def test_generate_static_gives_the_same_greedy_tokens_and_stops():
    model = tiny(kv_heads=2, seed=1)
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [7, 8, 9, 10]]  # ragged, one prompt twice
    with torch.inference_mode():
        free = generate(model, prompts, max_new_tokens=12, temperature=0, static=False)
    # A stop token that some rows hit early and others never: rows must end at their own first stop.
    stop = free[0].tokens[3]
    dynamic = generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids=[stop], static=False)
    static = generate(model, prompts, max_new_tokens=12, temperature=0, stop_ids=[stop], static=True)
    assert [c.tokens for c in static] == [c.tokens for c in dynamic]
    assert [c.finished for c in static] == [c.finished for c in dynamic]
    assert any(c.finished for c in static) and len(static[0].tokens) <= 4
    for s, d in zip(static, dynamic):
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(d.logprobs), rtol=1e-4, atol=1e-4)


def test_generate_static_streams_each_rows_tokens_once():
    model = tiny(seed=2)
    seen = {}
    out = generate(model, [[1, 2], [3]], max_new_tokens=6, temperature=0, static=True,
                   on_token=lambda row, tok: seen.setdefault(row, []).append(tok))
    assert seen == {0: out[0].tokens, 1: out[1].tokens}


def test_generate_leaves_the_static_path_to_models_without_adapters():
    from prefcli import lora
    from prefcli.static_decode import plain_linears

    model = tiny(seed=3)
    assert plain_linears(model)
    lora.add_adapters(model, lora.LoraSpec(4, None, 0.0, ("q_proj", "v_proj")))
    assert not plain_linears(model)
