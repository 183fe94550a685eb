"""The one transformer: a decoder-only Llama-family model, its heads and its KV cache.

RMSNorm, rotary position embeddings (HF Llama's rotate_half convention), SwiGLU MLP,
grouped-query attention through `F.scaled_dot_product_attention`, optional tied
embeddings and optional q/k/v bias (Qwen2). Parameter names and config keys follow
HF Llama, so a saved folder is a Hugging Face model folder and back:

    model.embed_tokens.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.weight   (+ q/k/v .bias when attention_bias)
    model.layers.N.mlp.{gate,up,down}_proj.weight
    model.layers.N.{input,post_attention}_layernorm.weight
    model.norm.weight
    lm_head.weight        next-token head (absent from files when tied to embed_tokens)
    score.weight          scalar head [1, hidden] of reward and value models

(Over 400 lines on purpose: the model, its KV cache, LoRA hooks and the chunked head are one
unit that reads top to bottom, as nanoGPT's model.py does.)
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from prefcli.errors import PrefcliError

# SDPA learned grouped-query attention (enable_gqa) in torch 2.5.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


# ----------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    """Model shape, with Hugging Face's key names."""

    vocab_size: int
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2-style: bias on q, k, v (never on o)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # The weights' dtype on disk ("bfloat16", ...), kept when saved again; storage, not shape (no compare).
    dtype: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict, folder: str | Path = "config") -> "ModelConfig":
        """Read a Llama, Mistral, Qwen2 or SmolLM config.json dict; refuse what we don't implement."""
        where = f"{folder}/config.json" if str(folder) != "config" else "config.json"
        arch = (d.get("architectures") or [""])[0]
        model_type = d.get("model_type", "")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise PrefcliError(
                f"{where}: unsupported architecture {model_type or arch or 'unknown'!r}",
                "prefcli runs Llama-family models: llama, mistral, qwen2 (SmolLM is llama)",
            )
        if d.get("hidden_act", "silu") != "silu":
            raise PrefcliError(f"{where}: unsupported hidden_act {d['hidden_act']!r}", "only silu (SwiGLU) is implemented")
        if d.get("mlp_bias"):
            raise PrefcliError(f"{where}: mlp_bias is not supported", "use a model without MLP bias")
        if model_type == "llama" and d.get("attention_bias"):
            raise PrefcliError(f"{where}: Llama attention_bias (bias on o_proj too) is not supported",
                               "only Qwen2-style q/k/v bias is implemented")
        context = d.get("max_position_embeddings", 2048)
        window = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            window = None
        if window is not None and window < context:
            raise PrefcliError(
                f"{where}: sliding_window {window} is shorter than the context {context}",
                "sliding-window attention is not implemented; use a model with sliding_window null",
            )

        # transformers 5 writes rope_parameters; 4.x wrote rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or d.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise PrefcliError(f"{where}: partial_rotary_factor is not supported")
        if rope_type == "default":
            scaling = None
        elif rope_type == "llama3":
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in
                       ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
        else:
            raise PrefcliError(f"{where}: rope scaling type {rope_type!r} is not implemented",
                               "prefcli implements default RoPE and llama3 scaling")

        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=context,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype"),
        )

    def to_hf_dict(self, kind: str = "causal_lm") -> dict:
        """The config.json transformers loads: Llama, or Qwen2 when attention_bias."""
        if kind not in ("causal_lm", "reward"):
            raise ValueError(f"kind must be 'causal_lm' or 'reward', not {kind!r}")
        family = "Qwen2" if self.attention_bias else "Llama"
        head = "ForCausalLM" if kind == "causal_lm" else "ForSequenceClassification"
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d = {
            "architectures": [family + head],
            "model_type": family.lower(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,  # transformers 5
            "rope_theta": self.rope_theta,  # transformers 4.x
            "rope_scaling": self.rope_scaling,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "torch_dtype": self.dtype or "float32",
            "use_cache": True,
        }
        if family == "Llama":
            d.update(attention_bias=False, mlp_bias=False)
        else:
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        if kind == "reward":
            d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return d


# Shapes of the built-in sizes (vocab comes from the tokenizer). ffn ~ 8/3 * dim, rounded to 64.
SIZE_PRESETS: dict[str, dict] = {
    "tiny": dict(dim=128, layers=4, heads=4, kv_heads=4, ffn_dim=384, context=128),  # ~1.1M @ vocab 2048
    "small": dict(dim=256, layers=6, heads=8, kv_heads=8, ffn_dim=704, context=256),  # ~5.3M
    "base": dict(dim=512, layers=8, heads=8, kv_heads=8, ffn_dim=1408, context=512),  # ~26M
    "gpt2": dict(dim=768, layers=12, heads=12, kv_heads=12, ffn_dim=2048, context=1024),  # ~124M @ vocab 50257
}


def make_config(size: str, vocab_size: int, *, layers: int | None = None, dim: int | None = None,
                heads: int | None = None, kv_heads: int | None = None, ffn_dim: int | None = None,
                context: int | None = None, **fields) -> ModelConfig:
    """A ModelConfig from a preset name; any override that is None keeps the preset's value.

    `fields` are further ModelConfig fields (rope_theta, tie_word_embeddings, bos_token_id, ...).
    """
    if size not in SIZE_PRESETS:
        raise PrefcliError(f"unknown model size {size!r}", f"choose one of {', '.join(SIZE_PRESETS)}")
    p = dict(SIZE_PRESETS[size])
    if dim is not None and ffn_dim is None:
        ffn_dim = 64 * math.ceil(8 * dim / 3 / 64)
    given = dict(layers=layers, dim=dim, heads=heads, kv_heads=kv_heads, ffn_dim=ffn_dim, context=context)
    if heads is not None and kv_heads is None:
        given["kv_heads"] = heads
    p.update({k: v for k, v in given.items() if v is not None})
    for name, value in p.items():
        if value < 1:
            raise PrefcliError(f"model option {name}={value} must be positive")
    if p["dim"] % p["heads"]:
        raise PrefcliError(f"model dim {p['dim']} is not divisible by heads {p['heads']}", "pick heads that divide dim")
    if p["heads"] % p["kv_heads"]:
        raise PrefcliError(f"model heads {p['heads']} is not divisible by kv_heads {p['kv_heads']}",
                           "pick kv_heads that divide heads")
    unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise PrefcliError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=p["dim"], intermediate_size=p["ffn_dim"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
        max_position_embeddings=p["context"], **fields,
    )


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values of every layer: [batch, kv_heads, max_len, head_dim] each.

    All rows share one write position (`length`); padded rows carry a key mask instead,
    so a left-padded batch decodes in lockstep. `seen[b]` counts row b's real tokens:
    the position id its next token gets.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        # Uninitialised: attention only reads positions below `length`, which are always written first.
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.has_padding = False
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: "Transformer", batch_size: int, max_len: int) -> "KVCache":
        p = model.model.embed_tokens.weight
        return cls(model.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def reset(self) -> None:
        self.crop(0)

    def crop(self, n: int) -> None:
        """Keep the first n positions (drop the rest); no copy."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {n}")
        self.length = n
        self.key_mask[:, n:] = True
        self.seen = self.key_mask[:, :n].sum(-1)
        self.has_padding = not bool(self.key_mask[:, :n].all())

    def select_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Keep these batch rows, in this order; a row may repeat (one prefilled prompt, several replies)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.seen.device)
        n = self.length

        def pick(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty((len(rows),) + t.shape[1:])
            out[:, :, :n] = t[:, :, :n].index_select(0, rows)  # positions past `length` hold nothing yet
            return out

        self.k = [pick(k) for k in self.k]
        self.v = [pick(v) for v in self.v]
        self.key_mask = self.key_mask.index_select(0, rows)
        self.seen = self.seen.index_select(0, rows)
        self.has_padding = not bool(self.key_mask[:, :self.length].all())

    def keep_rows(self, rows: list[int]) -> list[int]:
        """Keep only these batch rows (distinct), in place; returns the new order (old index of each row).

        Cheaper than select_rows when most rows stay (finished replies leaving a batch): each
        dropped row below the new batch size is overwritten by a kept row from the end, and the
        cache becomes a view of its first len(rows) rows. Only the moved rows are copied.
        """
        n = len(rows)
        kept = set(rows)
        holes = [i for i in range(n) if i not in kept]
        movers = [r for r in rows if r >= n]
        order = list(range(n))
        for h, m in zip(holes, movers):
            order[h] = m
        if holes:
            dst = torch.tensor(holes, device=self.seen.device)
            src = torch.tensor(movers, device=self.seen.device)
            for t in self.k + self.v:
                t[dst, :, :self.length] = t[src, :, :self.length]
            self.key_mask[dst] = self.key_mask[src]
            self.seen[dst] = self.seen[src]
        self.k = [k[:n] for k in self.k]
        self.v = [v[:n] for v in self.v]
        self.key_mask, self.seen = self.key_mask[:n], self.seen[:n]
        if self.has_padding:
            self.has_padding = not bool(self.key_mask[:, :self.length].all())
        return order


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one call: decoding is overhead-bound
        # Normalise in float32, scale in the input dtype (as HF Llama does).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies theta^(-2i/d), with Llama 3's long-context scaling if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s:  # llama3: slow down low frequencies by `factor`, interpolate the middle band
        old_len = s["original_max_position_embeddings"]
        low_wavelen = old_len / s["low_freq_factor"]
        high_wavelen = old_len / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(middle, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def concat_linears(*layers: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of several projections of one input stacked: one matmul instead of several."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
    return weight, bias


class _StackedLinear(torch.autograd.Function):
    """x @ cat(W_i).T (+ cat(b_i)) in one matmul, keeping the layers' own weights for backward.

    Plain autograd over `F.linear(x, torch.cat(weights))` keeps the stacked copy of the weights
    alive until backward: one per layer per forward call, 790 MB of a 2 GB step on SmolLM2
    (measured with saved-tensor hooks). Here backward stacks them again for a moment instead.
    """

    @staticmethod
    def forward(ctx, x, n, *params):
        weights, biases = params[:n], params[n:]
        weight = torch.cat(weights)
        y = F.linear(x, weight, torch.cat(biases) if biases else None)  # under autocast: its dtype
        ctx.n, ctx.sizes, ctx.has_bias, ctx.x_dtype = n, [w.shape[0] for w in weights], bool(biases), x.dtype
        weight_grads = any(ctx.needs_input_grad[2:2 + n])
        ctx.save_for_backward(x if weight_grads else None, *weights)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        n = ctx.n
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ torch.cat(weights).to(grad.dtype)).to(ctx.x_dtype)
        parts = grad.split(ctx.sizes, dim=-1)
        weight_grads = [None] * n
        if x is not None:
            flat_x = x.reshape(-1, x.shape[-1]).to(grad.dtype)
            weight_grads = [(g.reshape(-1, g.shape[-1]).T @ flat_x).to(w.dtype) if ctx.needs_input_grad[2 + i] else None
                            for i, (g, w) in enumerate(zip(parts, weights))]
        bias_grads = []
        if ctx.has_bias:
            bias_grads = [g.reshape(-1, g.shape[-1]).sum(0).to(w.dtype) if ctx.needs_input_grad[2 + n + i] else None
                          for i, (g, w) in enumerate(zip(parts, weights))]
        return (grad_x, None, *weight_grads, *bias_grads)


def stacked_linear(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """The outputs of several projections of x, stacked on the last dim (see `_StackedLinear`)."""
    if not torch.is_grad_enabled():
        return F.linear(x, *concat_linears(*layers))
    biases = [layer.bias for layer in layers] if layers[0].bias is not None else []
    return _StackedLinear.apply(x, len(layers), *[layer.weight for layer in layers], *biases)


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per row (a decode step): q [B, H, 1, D], k/v [B, KV, S, D] -> [B, H, 1, D].

    mask: None, or [B, 1, 1, S] (True = may attend). On CPU, for a batch of rollouts, two
    batched matmuls beat SDPA's kernel (by up to 1.5x at 64 rows x 4 heads). The query heads
    that share a key head (GQA) stand in for the query positions, so keys and values are
    never repeated.
    """
    B, H, _, D = q.shape
    KV = k.shape[1]
    scores = (q * D ** -0.5).view(B, KV, H // KV, D) @ k.transpose(-1, -2)  # [B, KV, H/KV, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).view(B, H, 1, D)


def adapter_term(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor | None:
    """The LoRA term of one projection (`prefcli.lora`): scale * B(A(dropout(x))); None without one."""
    A = layer._modules.get("lora_A")
    if A is None or not layer.lora_on:
        return None
    if layer.lora_dropout and layer.training:
        x = F.dropout(x, layer.lora_dropout, training=True)
    return F.linear(F.linear(x, A.weight), layer.lora_B.weight) * layer.lora_scale


def adapter_terms(x: torch.Tensor, layers) -> torch.Tensor | None:
    """LoRA terms of several projections of x, stacked like their outputs (zeros where a layer has none)."""
    terms = [adapter_term(x, layer) for layer in layers]
    if all(t is None for t in terms):
        return None
    return torch.cat([t if t is not None else x.new_zeros(*x.shape[:-1], layer.out_features)
                      for t, layer in zip(terms, layers)], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.fused = None  # (weight, bias) of q|k|v, kept by `fused_projections` while decoding

    def forward(self, x, cos, sin, mask, is_causal, cache: KVCache | None):
        B, T, _ = x.shape
        H, KV = self.n_heads, self.n_kv
        qkv = F.linear(x, *self.fused) if self.fused else stacked_linear(x, self.q_proj, self.k_proj, self.v_proj)
        lora = adapter_terms(x, (self.q_proj, self.k_proj, self.v_proj))
        if lora is not None:
            qkv = qkv + lora
        qkv = qkv.view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)
        qk, v = qkv[:, :H + KV], qkv[:, H + KV:]
        qk = qk * cos + rotate_half(qk) * sin  # RoPE on queries and keys at once
        q, k = qk[:, :H], qk[:, H:]
        if cache is not None:  # write the new keys/values in place, attend over everything so far
            start = cache.length
            cache.k[self.layer][:, :, start:start + T] = k
            cache.v[self.layer][:, :, start:start + T] = v
            k = cache.k[self.layer][:, :, :start + T]
            v = cache.v[self.layer][:, :, :start + T]
        if T == 1 and B * H >= 64 and x.device.type == "cpu":  # below ~64 rows x heads SDPA is faster (measured)
            y = one_query_attention(q, k, v, mask)
        else:
            if KV != H and not _SDPA_HAS_GQA:
                k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
            gqa = {"enable_gqa": True} if KV != H and _SDPA_HAS_GQA else {}
            if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                # CPU attention in float32 under bf16 autocast: its bf16 kernel is slower (3.6x on
                # SmolLM2's shapes, measured); q and k are float32 already (RoPE's tables).
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                       is_causal=is_causal, **gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)
        y = y.transpose(1, 2).reshape(B, T, H * self.head_dim)
        out = F.linear(y, self.o_proj.weight)
        lora = adapter_term(y, self.o_proj)
        return out if lora is None else out + lora


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused = None  # (weight, None) of gate|up, kept by `fused_projections` while decoding

    def forward(self, x):
        gate_up = F.linear(x, *self.fused) if self.fused else stacked_linear(x, self.gate_proj, self.up_proj)
        lora = adapter_terms(x, (self.gate_proj, self.up_proj))
        if lora is not None:
            gate_up = gate_up + lora
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up
        out = F.linear(h, self.down_proj.weight)
        lora = adapter_term(h, self.down_proj)
        return out if lora is None else out + lora


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@contextmanager
def fused_projections(model: "Transformer"):
    """Stack q|k|v and gate|up weights once for a whole decode instead of on every forward.

    Token-by-token decoding is dominated by per-call overhead, so this matters there; the
    weights must not change inside the block (the copies would go stale). Costs one extra
    copy of those weights while active. Re-entrant. LoRA adapters stay separate: their
    terms are added after the fused matmul, so fusing and adapters do not interfere.
    """
    blocks = list(model.model.layers)
    if not blocks or blocks[0].self_attn.fused is not None:
        yield
        return
    try:
        with torch.no_grad():
            for b in blocks:
                b.self_attn.fused = concat_linears(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj)
                b.mlp.fused = concat_linears(b.mlp.gate_proj, b.mlp.up_proj)
        yield
    finally:
        for b in blocks:
            b.self_attn.fused = b.mlp.fused = None


# ----------------------------------------------------------------------------- the model

class Transformer(nn.Module):
    """Decoder-only transformer with a next-token head (`lm_head`) and/or a scalar head (`score`)."""

    def __init__(self, config: ModelConfig, lm_head: bool = True, score_head: bool = False):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if lm_head else None
        # The module is "score", HF's name for the scalar head (`score.weight`). No method may
        # be called `score`: it would shadow the module for torch's state-dict tools.
        if score_head:
            self.score = nn.Linear(config.hidden_size, 1, bias=False)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the residual stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_hidden_layers))
        if lm_head and config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE cos/sin tables per device, float32 and outside the state dict (so .to(dtype) keeps them exact).
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.grad_checkpoint = False  # activation checkpointing per block while training (--grad-checkpoint)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def score_head(self) -> nn.Linear | None:
        return self._modules.get("score")

    # -- positions and masks

    def _rope(self, position_ids: torch.Tensor | None, start: int, T: int, limit: int,
              device: torch.device, dtype: torch.dtype):
        """cos, sin [B or 1, 1, T, head_dim]; position_ids None means start..start+T for every row."""
        table = self._rope_tables.get(device)
        if table is None or table[0].shape[0] < limit:
            n = max(limit, 256, 2 * table[0].shape[0] if table is not None else 0)
            with torch.inference_mode(False):  # normal tensors, even when first built while generating
                freqs = torch.arange(n, device=device).float()[:, None] * rope_inv_freq(self.config).to(device)
                emb = torch.cat((freqs, freqs), dim=-1)
                table = self._rope_tables[device] = (emb.cos(), emb.sin())
        cos, sin = table
        if position_ids is None:
            cos, sin = cos[start:start + T][None, None], sin[start:start + T][None, None]
        else:
            cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]
        return cos.to(dtype), sin.to(dtype)

    def _positions_and_mask(self, input_ids, attention_mask, position_ids, document_ids, cache):
        """Position ids (None: start..start+T), the SDPA mask (True = may attend), is_causal."""
        B, T = input_ids.shape
        dev = input_ids.device
        if attention_mask is not None and attention_mask.dim() == 3:  # a full mask: the caller's layout
            if position_ids is None or document_ids is not None or cache is not None:
                raise ValueError("a [B, T, T] attention_mask needs position_ids, and no document_ids or KV cache")
            return position_ids, attention_mask[:, None], False
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start} + {T} do not fit")
        new_valid = attention_mask.bool() if attention_mask is not None else None
        key_valid = new_valid  # [B, S] which keys are real tokens (None = all)
        if cache is not None and T == 1 and new_valid is None and position_ids is None and document_ids is None:
            # A decode step (one real token per row), the hot path of generation: the token's position
            # is its row's count of real tokens, and it may see every real key, itself included
            # (key_mask is True past `length`).
            if not cache.has_padding:
                cache.seen += 1
                return None, None, False
            position_ids = cache.seen[:, None].clone()
            cache.seen += 1
            return position_ids, cache.key_mask[:, None, None, :start + 1], False
        if cache is not None:
            if new_valid is not None:
                cache.key_mask[:, start:start + T] = new_valid
                cache.has_padding = cache.has_padding or not bool(new_valid.all())
            if position_ids is None and (new_valid is not None or cache.has_padding):
                # Each row's next positions count its real tokens only.
                count = new_valid.long() if new_valid is not None else torch.ones(1, T, dtype=torch.long, device=dev)
                position_ids = (cache.seen[:, None] + count.cumsum(-1) - 1).clamp(min=0)
            cache.seen += new_valid.sum(-1) if new_valid is not None else T
            key_valid = cache.key_mask[:, :start + T] if cache.has_padding else None

        if document_ids is None and position_ids is None and new_valid is not None:
            # As HF generate does: count real tokens, pads get position 0.
            position_ids = (new_valid.long().cumsum(-1) - 1).clamp(min=0)
        if key_valid is None and document_ids is None:
            if T == 1:
                return position_ids, None, False
            if start == 0:
                return position_ids, None, True  # fast path: plain causal attention

        queries = torch.arange(start, start + T, device=dev)
        keys = torch.arange(start + T, device=dev)
        mask = keys[None, :] <= queries[:, None]  # [T, S] causal, offset by what is cached
        if document_ids is not None:
            # Packed rows: positions restart at each document; attention stays inside it.
            first = torch.ones_like(document_ids, dtype=torch.bool)
            first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
            doc_start = torch.where(first, queries, torch.zeros_like(queries)).cummax(-1).values
            if position_ids is None:
                position_ids = queries - doc_start
            mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])
        if key_valid is not None:
            # A pad query would see no key at all (NaN); let every query see itself.
            mask = (mask & key_valid[:, None, :]) | (keys[None, :] == queries[:, None])
        return position_ids, (mask[:, None] if mask.dim() == 3 else mask), False

    # -- forward passes

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, return_hidden: bool = False,
                embed_offset: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab], or the final normed hidden states [B, T, hidden] if return_hidden.

        attention_mask: [B, T] 1 = token, 0 = padding (left or right). Without position_ids,
        positions count real tokens only (as HF generate does), so a left-padded row gives the
        same outputs as the row alone. Or [B, T, T] bool, True where query t may attend to key
        s, given with position_ids: a layout the other arguments cannot say (one prompt, two
        replies: `shared_prompt_logprobs`); no query's row may be all False. document_ids:
        [B, T] packed documents; attention never crosses documents and positions restart at
        each. kv_cache: append these tokens to the cache and attend over everything in it.
        embed_offset: added to the token embeddings, [B, hidden] (one vector per sequence, every
        token) or anything that broadcasts to [B, T, hidden]; the steering of `prefcli.steer`
        (None: the plain model).
        """
        if document_ids is not None and kv_cache is not None:
            raise ValueError("document_ids (packed training rows) cannot be used with a KV cache")
        x = self.model.embed_tokens(input_ids)
        if embed_offset is not None:
            x = x + (embed_offset[:, None] if embed_offset.dim() == 2 else embed_offset).to(x.dtype)
        T = input_ids.shape[1]
        start = kv_cache.length if kv_cache is not None else 0
        limit = int(position_ids.max()) + 1 if position_ids is not None else start + T
        pos, mask, is_causal = self._positions_and_mask(input_ids, attention_mask, position_ids,
                                                        document_ids, kv_cache)
        cos, sin = self._rope(pos, start, T, limit, x.device, x.dtype)
        checkpointed = self.grad_checkpoint and self.training and torch.is_grad_enabled() and kv_cache is None
        for block in self.model.layers:
            if checkpointed:  # keep only each block's input; recompute its insides in backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, is_causal, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.length += input_ids.shape[1]
        x = self.model.norm(x)
        if return_hidden:
            return x
        if self.lm_head is None:
            raise ValueError("this model has no lm_head (a reward model); use sequence_scores() or return_hidden=True")
        return self.lm_head(x)

    def token_scores(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar head at every position: [B, T] (per-token values of a PPO value model)."""
        if self.score_head is None:
            raise ValueError("this model has no score head; build it with score_head=True")
        h = self(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 document_ids=document_ids, return_hidden=True)
        return self.score_head(h).squeeze(-1)

    def sequence_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar reward [B] at each row's rightmost real token.

        That is the token HF's LlamaForSequenceClassification pools (rightmost token that is
        not pad_token_id) as long as the pad id only appears in padding.
        """
        values = self.token_scores(input_ids, attention_mask=attention_mask)
        if attention_mask is None:
            return values[:, -1]
        idx = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (idx * attention_mask.long()).argmax(-1)
        return values[torch.arange(values.shape[0], device=values.device), last]


# ----------------------------------------------------------------------------- log-probs without full logits

def _bare(model: nn.Module) -> nn.Module:
    """The Transformer under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def chunked_sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                              loss_mask: torch.Tensor | None = None,
                              document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """objectives.lm.sequence_logprobs of the model's next-token predictions, never holding
    full-vocabulary logits: the head runs chunk by chunk on the counted positions only.

    model may be wrapped (DDP, compiled): the forward goes through the wrapper.
    -> (summed log-prob of the counted tokens [B] float32, their count [B]).
    """
    from prefcli.objectives.lm import sequence_logprobs_from_hidden

    hidden = model(input_ids, attention_mask=attention_mask, document_ids=document_ids, return_hidden=True)
    return sequence_logprobs_from_hidden(hidden, _bare(model).lm_head.weight, input_ids, loss_mask)


def chunked_lm_loss(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                    loss_mask: torch.Tensor | None = None,
                    document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """objectives.lm.lm_loss of the model on these tokens, chunked (see chunked_sequence_logprobs)."""
    sums, counts = chunked_sequence_logprobs(model, input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                                             document_ids=document_ids)
    n_tokens = counts.sum()
    return -sums.sum() / n_tokens.clamp(min=1), n_tokens


def chunked_reply_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           start: int) -> torch.Tensor:
    """log p of every token from column `start` on, [B, T - start] float32, chunked (online RL's replies)."""
    from prefcli.objectives.lm import selective_logprobs

    hidden = model(input_ids, attention_mask=attention_mask, return_hidden=True)[:, start - 1:-1]
    return selective_logprobs(hidden, _bare(model).lm_head.weight, input_ids[:, start:])


def shared_prompt_layout(prompt_lengths: torch.Tensor, splits: torch.Tensor, lengths: torch.Tensor, T: int):
    """Positions, attention mask and predecessors of rows that hold one prompt and two replies.

    Row b: the prompt in columns [0, P), the first reply in [P, S), the second in [S, L), then
    padding (P, S, L = prompt_lengths[b], splits[b], lengths[b]; P >= 1 when S < L). The second
    reply is laid out as if it followed the prompt alone: its positions restart at P, and it
    attends to the prompt and to itself, never to the first reply. A row of one plain sequence
    has P = S = L. -> position_ids [B, T], mask [B, T, T] (True = query may attend to key), and
    prev [B, T]: the column whose hidden state predicts each token (t - 1, but P - 1 for the
    second reply's first token: the prompt's last state predicts both replies' first tokens).
    """
    idx = torch.arange(T, device=lengths.device)
    P, S, L = prompt_lengths[:, None], splits[:, None], lengths[:, None]
    second = (idx >= S) & (idx < L)
    position_ids = torch.where(second, idx - S + P, idx)
    causal = idx[:, None] >= idx[None, :]
    same_reply = second[:, :, None] == second[:, None, :]
    # Keys: real tokens of the prompt or of the query's own reply. Padding queries count as the
    # first reply's and see the prompt (no query row is empty, which would give NaN).
    mask = causal & (idx < L)[:, None, :] & ((idx < P)[:, None, :] | same_reply)
    prev = torch.where(idx == S, P - 1, idx - 1)
    return position_ids, mask, prev


def shared_prompt_logprobs(model: nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                           prompt_lengths: torch.Tensor, splits: torch.Tensor,
                           lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chunked_sequence_logprobs of two replies to one prompt from one row each (the prompt runs once).

    Rows as shared_prompt_layout describes them (`data.examples.pad_shared_prompt` builds them);
    loss_mask [B, T] marks each reply's counted tokens. Equal to the two sequences prompt + first
    and prompt + second scored apart, gradients included. model may be wrapped (DDP, compiled).
    -> (summed log-probs [B, 2] float32: first reply, second reply; their token counts [B, 2]).
    """
    from prefcli.objectives.lm import selective_logprobs

    B, T = input_ids.shape
    position_ids, mask, prev = shared_prompt_layout(prompt_lengths, splits, lengths, T)
    hidden = model(input_ids, attention_mask=mask, position_ids=position_ids, return_hidden=True)
    idx = torch.arange(T, device=input_ids.device)
    counted = loss_mask.bool() & (idx >= 1) & (idx < lengths[:, None])
    rows, cols = counted.nonzero(as_tuple=True)
    per_token = selective_logprobs(hidden[rows, prev[rows, cols]], _bare(model).lm_head.weight, input_ids[rows, cols])
    bins = 2 * rows + (cols >= splits[rows]).long()
    sums = torch.zeros(2 * B, dtype=torch.float32, device=hidden.device).index_add(0, bins, per_token)
    counts = torch.zeros(2 * B, dtype=torch.long, device=hidden.device).index_add(0, bins, torch.ones_like(bins))
    return sums.view(B, 2), counts.view(B, 2)


# ----------------------------------------------------------------------------- save / load

def save_model(model: Transformer, folder: str | Path, kind: str = "causal_lm",
               generation_config: dict | None = None) -> None:
    """Write a Hugging Face model folder: config.json, model.safetensors, generation_config.json.

    kind "causal_lm" stores the lm_head (once, as embed_tokens, when tied); kind "reward"
    stores the score head and no lm_head (LlamaForSequenceClassification's layout).
    """
    folder = Path(folder)
    if kind == "causal_lm" and model.lm_head is None:
        raise ValueError("a causal_lm folder needs a model with an lm_head")
    if kind == "reward" and model.score_head is None:
        raise ValueError("a reward folder needs a model with a score head")
    config = model.config
    if any(".lora_" in name for name in model.state_dict()):
        raise ValueError("the model has LoRA adapters: save them with prefcli.lora.save_adapter or merge them first")
    # Weights keep the dtype they were loaded with (a bf16 checkpoint stays bf16), whatever they trained in.
    store = getattr(torch, config.dtype, None) if config.dtype in ("float32", "bfloat16", "float16") else None
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("lm_head.") and (kind == "reward" or config.tie_word_embeddings):
            continue
        if name.startswith("score.") and kind == "causal_lm":
            continue
        t = t.detach().to("cpu")
        tensors[name] = (t.to(store) if store is not None and t.is_floating_point() else t).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    hf = config.to_hf_dict(kind)
    hf["torch_dtype"] = hf["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id, **(generation_config or {})}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise PrefcliError(f"{index}: not a valid safetensors index ({e})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise PrefcliError(f"{index}: names {f.name}, which is missing from {folder}")
    elif (folder / "pytorch_model.bin").exists() or list(folder.glob("pytorch_model*.bin")):
        raise PrefcliError(
            f"{folder}: weights are only in pytorch_model.bin (pickle), which prefcli never loads",
            "convert it to safetensors with transformers: model.save_pretrained(folder, safe_serialization=True)",
        )
    else:
        raise PrefcliError(f"{folder}: no model.safetensors found", "is this a model folder?")
    tensors = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                tensors[key] = sf.get_tensor(key)
    return tensors


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               kind: str | None = None, score_head: bool = False) -> Transformer:
    """Load a prefcli or Hugging Face Llama-family folder (safetensors only, never pickle).

    kind: None = whatever the folder holds; "causal_lm" or "reward" = insist on it.
    A reward folder (…ForSequenceClassification) loads with a score head and no lm_head.
    score_head=True on a causal-LM folder adds a freshly initialised score head (a new
    reward or value model on that backbone).
    """
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists():
        return _load_adapter_model(folder, device, dtype, kind, score_head)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise PrefcliError(f"{folder}: no config.json", "is this a model folder?")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise PrefcliError(f"{cfg_path}: invalid JSON ({e})") from None
    config = ModelConfig.from_hf_dict(hf, folder)
    arch = (hf.get("architectures") or [""])[0]
    found = "reward" if arch.endswith("ForSequenceClassification") else "causal_lm"
    if kind is not None and kind != found:
        raise PrefcliError(f"{folder}: holds a {found} model, not a {kind} model", "pick a model of the right kind")
    if found == "reward" and hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise PrefcliError(f"{cfg_path}: a reward model needs num_labels 1")

    # Built on the meta device: no random init of weights the file replaces (on a 135M model that
    # was seconds, and a second copy of the weights at the peak of memory).
    with torch.device("meta"):
        model = Transformer(config, lm_head=found == "causal_lm", score_head=score_head or found == "reward")
    tensors = {k: v for k, v in _read_weights(folder).items() if not k.endswith("rotary_emb.inv_freq")}
    expected = set(model.state_dict())
    optional = set()
    if found == "causal_lm" and config.tie_word_embeddings:
        optional.add("lm_head.weight")  # tied: stored once as embed_tokens
        if "lm_head.weight" in tensors:
            tensors.pop("lm_head.weight")
    if found == "causal_lm" and score_head:
        optional.add("score.weight")  # fresh head
    missing = sorted(expected - set(tensors) - optional)
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise PrefcliError(
            f"{folder}: weights do not match config.json"
            + (f"; missing {', '.join(missing[:5])}" if missing else "")
            + (f"; unexpected {', '.join(unexpected[:5])}" if unexpected else ""),
            "the folder may be damaged or of an unsupported architecture",
        )
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for name, t in tensors.items():
        want = shapes[name]
        if t.shape != want:
            raise PrefcliError(f"{folder}: {name} has shape {tuple(t.shape)}, config.json implies {tuple(want)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if model.lm_head is not None and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign replaced the shared parameter
    _init_fresh(model)
    return model.to(device=device, dtype=dtype)


def _init_fresh(model: Transformer) -> None:
    """Give the parameters the file did not hold (a new score head) real, initialised storage."""
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and all(p.is_meta for p in own):  # a whole new module (the file holds none of it)
            module.to_empty(device="cpu", recurse=False)
            Transformer._init_weights(module)


def _load_adapter_model(folder: Path, device, dtype, kind: str | None, score_head: bool) -> Transformer:
    """A PEFT LoRA adapter folder as a model: its base (lineage, else adapter_config.json) with the
    adapter merged in (decoding runs at full speed; the adapter is remembered for stacking)."""
    from prefcli import lora

    cfg = lora.read_adapter_config(folder)
    found = "reward" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"
    if kind is not None and kind != found:
        raise PrefcliError(f"{folder}: holds a {found} adapter, not a {kind} model", "pick a model of the right kind")
    base = lora.adapter_base(folder)
    model = load_model(base, device="cpu", dtype=torch.float32, score_head=score_head or found == "reward")
    if found == "reward":
        model.lm_head = None
    lora.apply_adapter(model, folder, remember=True)
    model.lora_base = getattr(model, "lora_base", base)
    return model.to(device=device, dtype=dtype)
