"""The transformer against Hugging Face transformers, both ways, plus masks, packing and the KV cache."""

import json

import pytest
import torch

from prefcli.errors import PrefcliError
from prefcli.model import (
    SIZE_PRESETS,
    KVCache,
    ModelConfig,
    Transformer,
    count_parameters,
    fused_projections,
    load_model,
    make_config,
    save_model,
    stacked_linear,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 97


def tiny_config(**overrides) -> ModelConfig:
    kw = dict(dim=32, layers=2, heads=4, ffn_dim=64, context=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    return make_config("tiny", VOCAB, **kw)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from init (norm gains around 1, biases non-zero) so every part shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- ours -> transformers

@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False),  # plain Llama
    dict(),  # tied embeddings (the preset default)
    dict(kv_heads=2, rope_theta=500000.0),  # grouped-query attention, other RoPE base
    dict(kv_heads=2, attention_bias=True),  # Qwen2-style q/k/v bias
], ids=["llama", "tied", "gqa", "qwen2-bias"])
def test_transformers_loads_our_folder_with_same_logits(tmp_path, overrides):
    model = randomize(Transformer(tiny_config(**overrides))).eval()
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = "Qwen2ForCausalLM" if overrides.get("attention_bias") else "LlamaForCausalLM"
    assert type(hf).__name__ == expected
    x = tokens(2, 16)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 1  # the comparison below is not between near-zero numbers
    assert (ours - theirs).abs().max() <= 1e-4


def test_saved_folder_layout(tmp_path):
    model = Transformer(tiny_config(eos_token_id=[2, 5]))
    save_model(model, tmp_path, generation_config={"max_new_tokens": 7})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "max_new_tokens": 7}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied: stored once, as embed_tokens
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "model.norm.weight" in keys
    assert len(keys) == 1 + 2 * 9 + 1


# ----------------------------------------------------------------------------- transformers -> ours

def _hf_pair(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return transformers.LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=False), \
            transformers.LlamaForCausalLM
    if arch == "llama-tied-mha":
        return transformers.LlamaConfig(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=True), \
            transformers.LlamaForCausalLM
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True), transformers.Qwen2ForCausalLM
    if arch == "llama3-rope":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return transformers.LlamaConfig(**common, rope_parameters=rope), transformers.LlamaForCausalLM
    raise ValueError(arch)


@pytest.mark.parametrize("arch", ["llama", "llama-tied-mha", "mistral", "qwen2", "llama3-rope"])
def test_we_load_transformers_folder_with_same_logits(tmp_path, arch):
    torch.manual_seed(0)
    config, cls = _hf_pair(arch)
    hf = randomize(cls(config)).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    x = tokens(2, 40)  # past original_max_position_embeddings, so llama3 scaling matters
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 1
    assert (ours - theirs).abs().max() <= 1e-4


def test_loads_sharded_folder(tmp_path):
    config, cls = _hf_pair("llama")
    hf = randomize(cls(config)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    x = tokens(1, 8)
    with torch.no_grad():
        assert (load_model(tmp_path)(x) - hf(x).logits).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- reward head

def _right_padded(pad_id=0):
    x = tokens(3, 10, seed=3)
    mask = torch.ones_like(x)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    return x.masked_fill(mask == 0, pad_id), mask


def test_transformers_scores_our_reward_folder_the_same(tmp_path):
    model = randomize(Transformer(tiny_config(kv_heads=2), lm_head=False, score_head=True)).eval()
    save_model(model, tmp_path, kind="reward")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    x, mask = _right_padded()
    with torch.no_grad():
        ours, theirs = model.sequence_scores(x, mask), hf(x, attention_mask=mask).logits.squeeze(-1)
    assert ours.shape == (3,)
    assert (ours - theirs).abs().max() <= 1e-4
    # The score is the value at the last real token.
    assert torch.allclose(ours[0], model.token_scores(x, attention_mask=mask)[0, 5])


def test_we_load_transformers_reward_folder(tmp_path):
    config, _ = _hf_pair("qwen2")
    config.num_labels, config.pad_token_id = 1, 0
    hf = randomize(transformers.Qwen2ForSequenceClassification(config)).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.lm_head is None and model.score_head is not None
    x, mask = _right_padded()
    with torch.no_grad():
        assert (model.sequence_scores(x, mask) - hf(x, attention_mask=mask).logits.squeeze(-1)).abs().max() <= 1e-4
    with pytest.raises(PrefcliError, match="reward"):
        load_model(tmp_path, kind="causal_lm")


def test_score_head_on_a_causal_folder_is_fresh(tmp_path):
    base = randomize(Transformer(tiny_config()))
    save_model(base, tmp_path)
    rm = load_model(tmp_path, score_head=True)
    assert rm.score_head.weight.shape == (1, 32)
    assert torch.equal(rm.model.norm.weight, base.model.norm.weight)


# ----------------------------------------------------------------------------- masks and packing

def test_left_padded_batch_equals_each_row_alone():
    model = randomize(Transformer(tiny_config(kv_heads=2))).eval()
    rows = [tokens(1, n, seed=n)[0] for n in (9, 4, 7)]
    x = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, 9 - len(r):], mask[i, 9 - len(r):] = r, 1
    with torch.no_grad():
        batch = model(x, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            assert (batch[i, 9 - len(r):] - alone).abs().max() <= 1e-5


def test_packed_documents_equal_separate_passes():
    model = randomize(Transformer(tiny_config())).eval()
    docs = [tokens(1, n, seed=10 + n)[0] for n in (5, 3, 8)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        out = model(packed, document_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        plain = model(packed)[0]
    assert (out - alone).abs().max() <= 1e-5
    assert (plain[5:] - alone[5:]).abs().max() > 1e-2  # without document ids, documents do mix


def test_positions_follow_hf_generate_convention():
    model = randomize(Transformer(tiny_config())).eval()
    x = tokens(1, 6)
    with torch.no_grad():
        # RoPE is relative: shifting every position changes nothing, a gap does.
        assert (model(x, position_ids=torch.arange(3, 9)[None]) - model(x)).abs().max() <= 1e-5
        assert (model(x, position_ids=torch.tensor([[0, 1, 2, 6, 7, 8]])) - model(x)).abs().max() > 1e-2
        padded = model(torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1),
                       attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]]))[:, 3:]
        assert (padded - model(x)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- KV cache

def test_kv_cache_prefill_decode_extend_crop_equal_full_forward():
    model = randomize(Transformer(tiny_config(kv_heads=2, attention_bias=True))).eval()
    x = tokens(2, 20)
    with torch.inference_mode():
        full = model(x)
        cache = KVCache.for_model(model, 2, 32)
        parts = [model(x[:, :6], kv_cache=cache)]  # prefill
        parts += [model(x[:, t:t + 1], kv_cache=cache) for t in range(6, 10)]  # one token at a time
        parts.append(model(x[:, 10:20], kv_cache=cache))  # several new tokens (a chat turn)
        assert cache.length == 20
        assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5
        cache.crop(8)  # drop positions 8.. and take another path from there
        y = tokens(2, 5, seed=7)
        again = model(y, kv_cache=cache)
        assert (again - model(torch.cat([x[:, :8], y], 1))[:, 8:]).abs().max() <= 1e-5
        with fused_projections(model):  # the decode-time weight layout gives the same numbers
            assert (model(x) - full).abs().max() <= 1e-5


def test_kv_cache_with_left_padding_and_row_selection():
    model = randomize(Transformer(tiny_config())).eval()
    x = tokens(2, 8)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.inference_mode():
        cache = KVCache.for_model(model, 2, 16)
        model(x, attention_mask=mask, kv_cache=cache)
        step = tokens(2, 1, seed=5)
        out = model(step, kv_cache=cache)
        row1 = model(torch.cat([x[1:, 5:], step[1:]], 1))[:, -1]
        assert (out[1, -1] - row1[0]).abs().max() <= 1e-5
        cache.select_rows([1])
        out2 = model(step[1:], kv_cache=cache)
        assert (out2[0, -1] - model(torch.cat([x[1:, 5:], step[1:], step[1:]], 1))[0, -1]).abs().max() <= 1e-5


def test_kv_cache_overflow_is_an_error():
    model = Transformer(tiny_config())
    cache = KVCache.for_model(model, 1, 4)
    with torch.inference_mode(), pytest.raises(ValueError, match="4 positions"):
        model(tokens(1, 5), kv_cache=cache)


# ----------------------------------------------------------------------------- training path

def test_gradients_reach_every_projection():
    model = randomize(Transformer(tiny_config(attention_bias=True), score_head=True))
    x = tokens(2, 8)
    (model(x).logsumexp(-1).mean() + model.token_scores(x).mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_stacked_linear_matches_separate_projections(frozen, autocast):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, out) for out in (8, 4, 4)]
    for layer in layers:
        layer.requires_grad_(not frozen)
    x = torch.randn(2, 5, 8, requires_grad=True)
    probe = torch.randn(2, 5, 16)

    def grads(forward):
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward()
        (y.float() * probe).sum().backward()
        return [y.float(), x.grad] + [p.grad for layer in layers for p in (layer.weight, layer.bias)]

    got = grads(lambda: stacked_linear(x, *layers))
    want = grads(lambda: torch.cat([layer(x) for layer in layers], dim=-1))
    assert got[1].dtype == torch.float32
    tol = 0.05 if autocast else 1e-5
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def test_stacked_linear_keeps_no_stacked_copy_for_backward():
    """Backward holds the layers' own weights, not a fresh torch.cat of them per call."""
    model = randomize(Transformer(tiny_config()))
    model.requires_grad_(False)
    x = model.model.embed_tokens(tokens(2, 8)).requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shaped = []

    def pack(t):
        if t.dim() == 2:  # weights (activations here are [batch, time, features])
            weight_shaped.append(t.untyped_storage().data_ptr() in params)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block = model.model.layers[0]
        (block.mlp(x) + block.self_attn(x, *model._rope(None, 0, 8, 8, x.device, x.dtype), None, True, None)).sum().backward()
    assert len(weight_shaped) >= 4 and all(weight_shaped)


# ----------------------------------------------------------------------------- configs

def test_presets_and_parameter_counts():
    tiny = make_config("tiny", 2048)
    # embed 2048*128 (tied) + 4 layers * (4*128*128 attention + 3*128*384 mlp + 2*128 norms) + 128 final norm
    assert count_parameters(Transformer(tiny)) == 2048 * 128 + 4 * (4 * 128 * 128 + 3 * 128 * 384 + 256) + 128
    small = count_parameters(Transformer(make_config("small", 2048)))
    assert 4.5e6 < small < 6e6
    assert set(SIZE_PRESETS) == {"tiny", "small", "base", "gpt2"}
    gpt2 = SIZE_PRESETS["gpt2"]
    assert (gpt2["dim"], gpt2["layers"], gpt2["heads"], gpt2["context"]) == (768, 12, 12, 1024)
    c = make_config("small", 500, layers=2, dim=64, heads=4, kv_heads=2, context=None)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (2, 64, 4, 2, 16)
    assert c.intermediate_size == 192 and c.max_position_embeddings == SIZE_PRESETS["small"]["context"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(size="huge"), "unknown model size"),
    (dict(dim=100, heads=3), "not divisible by heads"),
    (dict(heads=4, kv_heads=3), "kv_heads"),
    (dict(layers=0), "layers=0"),
    (dict(colour="red"), "unknown model option"),
])
def test_make_config_errors(kwargs, match):
    size = kwargs.pop("size", "tiny")
    with pytest.raises(PrefcliError, match=match):
        make_config(size, 100, **kwargs)


def _llama_dict(**extra):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 32, **extra}


@pytest.mark.parametrize("d, match", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture 'gpt2'"),
    (dict(model_type="mistral", sliding_window=16), "sliding_window 16"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not implemented"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_from_hf_dict_refuses_what_it_cannot_run(d, match):
    with pytest.raises(PrefcliError, match=match) as err:
        ModelConfig.from_hf_dict(_llama_dict(**d), "models/x")
    assert "models/x/config.json" in str(err.value)


def test_from_hf_dict_reads_legacy_and_new_keys():
    old = ModelConfig.from_hf_dict(_llama_dict(rope_theta=5e5, num_key_value_heads=1))
    new = ModelConfig.from_hf_dict(_llama_dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert old.rope_theta == new.rope_theta == 5e5 and old.num_key_value_heads == 1 and old.head_dim == 4
    assert not old.tie_word_embeddings and not old.attention_bias
    mistral = ModelConfig.from_hf_dict(_llama_dict(model_type="mistral", sliding_window=32))  # window >= context
    assert mistral.hidden_size == 8
    qwen = ModelConfig.from_hf_dict(_llama_dict(model_type="qwen2", sliding_window=4, use_sliding_window=False))
    assert qwen.attention_bias
    assert ModelConfig.from_hf_dict(new.to_hf_dict()) == new


# ----------------------------------------------------------------------------- loading errors

def test_refuses_pickle_only_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llama_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PrefcliError, match="pickle"):
        load_model(tmp_path)


def test_missing_or_unexpected_weights_name_the_folder(tmp_path):
    model = Transformer(tiny_config())
    save_model(model, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors.pop("model.norm.weight")
    tensors["model.extra"] = torch.zeros(1)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(PrefcliError, match="missing model.norm.weight; unexpected model.extra") as err:
        load_model(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(PrefcliError, match="no config.json"):
        load_model(tmp_path / "nowhere")


def test_round_trip_in_bfloat16(tmp_path):
    model = randomize(Transformer(tiny_config()))
    save_model(model, tmp_path)
    half = load_model(tmp_path, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    x = tokens(1, 10)
    with torch.no_grad():
        assert (half(x).float() - model(x)).abs().max() < 0.05 * model(x).abs().max()


def test_cpu_attention_runs_in_float32_under_bf16_autocast(monkeypatch):
    """CPU's bf16 attention kernel is slower than its float32 one; the matmuls around it stay bf16."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = randomize(Transformer(tiny_config()))
    x = tokens(2, 8)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert got.dtype == torch.bfloat16
    assert seen[-1] == (torch.float32, torch.float32, torch.float32, False)
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
