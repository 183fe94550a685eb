"""Decode steps with every shape fixed, replayed from a CUDA graph on a GPU.

Token-by-token decoding of a small model on a GPU is bound by kernel launches (~200 per
step for 12 layers), not by memory bandwidth. A step whose tensors never change shape
can be captured once as a CUDA graph and replayed with one launch. The step writes its
keys and values at a slot held in a tensor and attends over the whole preallocated
cache under a mask, so nothing in it depends on a Python integer that changes per token.

The maths is `Transformer.forward`'s decode step; `tests/test_static_decode.py` checks the
logits match on CPU, where the same step runs eagerly (and is not faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefcli.model import KVCache, Transformer, rotate_half

try:  # SDPA learned grouped-query attention (enable_gqa) in torch 2.5
    F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4),
                                   enable_gqa=True)
    _GQA = True
except TypeError:  # pragma: no cover - old torch
    _GQA = False


def plain_linears(model: Transformer) -> bool:
    """True when no block projection carries a LoRA adapter (this step reads the stacked weights only)."""
    return not any("lora_A" in m._modules for b in model.model.layers for m in b.modules())


class StaticDecodeStep:
    """One decode step over `cache` for its whole batch: inputs in fixed buffers, logits out.

    Set `token` [B, 1]; call `prepare()` (reads the cache's length and per-row positions into
    buffers), then `run()`; then `advance()` to move the cache's bookkeeping on by one token,
    as the dynamic path does. Rows that finished keep decoding (their output is ignored):
    dropping rows would change shapes.
    """

    def __init__(self, model: Transformer, cache: KVCache, embed_offset: torch.Tensor | None = None):
        device = model.model.embed_tokens.weight.device
        self.model, self.cache, self.offset = model, cache, embed_offset
        B = cache.batch_size
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot this step writes
        self.position = torch.zeros(B, dtype=torch.long, device=device)  # each row's position id
        self.slots = torch.arange(cache.max_len, device=device)
        cfg = model.config
        self.H, self.KV, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Masked slots still enter softmax(scores) @ values as 0 * value: they must not hold NaN garbage.
        for t in cache.k + cache.v:
            t[:, :, cache.length:].zero_()
        # Build the rotary table for every position now: growing it inside a captured graph is impossible.
        model._rope(None, 0, 1, cache.max_len, device, model.model.embed_tokens.weight.dtype)

    def prepare(self) -> None:
        self.slot.fill_(self.cache.length)
        self.position.copy_(self.cache.seen)

    def advance(self) -> None:
        self.cache.seen += 1
        self.cache.length += 1

    def run(self) -> torch.Tensor:
        """Logits [B, vocab] of the token after `token`."""
        m, cache = self.model, self.cache
        B, H, KV, D = self.token.shape[0], self.H, self.KV, self.D
        x = m.model.embed_tokens(self.token)
        if self.offset is not None:
            x = x + (self.offset[:, None] if self.offset.dim() == 2 else self.offset).to(x.dtype)
        cos, sin = m._rope(self.position[:, None], 0, 1, cache.max_len, x.device, x.dtype)
        # May attend: real tokens (key_mask) up to and including the slot written now.
        mask = ((self.slots <= self.slot) & cache.key_mask)[:, None, None, :]
        gqa = {"enable_gqa": True} if KV != H and _GQA else {}
        for i, block in enumerate(m.model.layers):
            attn = block.self_attn
            weight, bias = attn.fused
            h = block.input_layernorm(x)
            qkv = F.linear(h, weight, bias).view(B, 1, H + 2 * KV, D).transpose(1, 2)
            qk, v = qkv[:, :H + KV], qkv[:, H + KV:]
            qk = qk * cos + rotate_half(qk) * sin
            q, k = qk[:, :H], qk[:, H:]
            cache.k[i].index_copy_(2, self.slot, k)
            cache.v[i].index_copy_(2, self.slot, v)
            keys, values = cache.k[i], cache.v[i]
            if KV != H and not gqa:
                keys, values = keys.repeat_interleave(H // KV, 1), values.repeat_interleave(H // KV, 1)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **gqa)
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, H * D), attn.o_proj.weight)
            x = x + block.mlp(block.post_attention_layernorm(x))
        return m.lm_head(m.model.norm(x)[:, -1])


class StaticDecoder:
    """`decoder(next_ids) -> logits`: one step of a StaticDecodeStep, replayed from a CUDA graph on CUDA.

    Use inside `fused_projections(model)` (the step reads the stacked weights, and a graph
    keeps their addresses); make one per cache (the graph is bound to its tensors).
    """

    def __init__(self, model: Transformer, cache: KVCache, embed_offset: torch.Tensor | None = None,
                 graph: bool | None = None):
        self.step = StaticDecodeStep(model, cache, embed_offset)
        device = self.step.token.device
        self.graph = None
        if graph if graph is not None else device.type == "cuda":
            self.step.prepare()  # warm-up writes land in the slot the first real step overwrites
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # lazy initialisations (cuBLAS handles, SDPA kernel choice) before capture
                    self.step.run()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step.run()

    def __call__(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.step.token.copy_(next_ids.view(-1, 1))
        self.step.prepare()
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self.step.run()
        self.step.advance()
        return logits
