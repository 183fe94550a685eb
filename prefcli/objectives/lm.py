"""Next-token log-probabilities and the language-modelling loss, as pure tensor functions.

Shift convention (the one place it lives): `logits[:, t]` predicts `input_ids[:, t + 1]`,
and `loss_mask` is aligned with `input_ids`, so `loss_mask[:, t + 1]` decides whether
predicting token t + 1 counts. `loss_mask[:, 0]` is never used: nothing predicts the
first token. Callers pass unshifted tensors; the shift happens here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | logits[b, t]) in float32: [B, T, V], [B, T] -> [B, T]. No shift.

    Half-precision logits are upcast one row at a time, so the float32 copy is [T, V]
    rather than [B, T, V]; log-probs in bf16 are too coarse for DPO-style differences.
    """
    if logits.dtype == torch.float32:
        flat = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        return -flat.view(targets.shape)
    rows = [-F.cross_entropy(row.float(), tgt, reduction="none") for row, tgt in zip(logits, targets)]
    return torch.stack(rows)


def _shifted(input_ids: torch.Tensor, loss_mask: torch.Tensor | None):
    """Targets and mask aligned with logits: position t holds token t + 1; the last position counts for nothing."""
    targets = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    mask = torch.ones_like(input_ids, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return targets, mask


def sequence_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the counted tokens of each row, and how many there were.

    logits [B, T, V], input_ids [B, T], loss_mask [B, T] (1 = this token counts; None = all)
    -> (sum_logps [B] float32, token_count [B] int64). See the module docstring for the shift.
    """
    targets, mask = _shifted(input_ids, loss_mask)
    per_token = token_logprobs(logits, targets)
    return (per_token * mask).sum(dim=1), mask.sum(dim=1).long()


def lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy, averaged over every counted token of the batch.

    loss = -sum_{b,t} mask[b,t+1] * log p(x[b,t+1] | x[b,<=t]) / sum_{b,t} mask[b,t+1]

    Returns (loss, n_tokens). The mean is per token across the batch (as transformers'
    causal-LM loss), not per row; n_tokens lets a caller re-weight across micro-batches
    or ranks. A batch with no counted token gives loss 0 (still attached to the graph).
    """
    sum_logps, counts = sequence_logprobs(logits, input_ids, loss_mask)
    n_tokens = counts.sum()
    return -sum_logps.sum() / n_tokens.clamp(min=1), n_tokens


# ----------------------------------------------------------------------------- chunked, from hidden states

CHUNK_TOKENS = 1024  # positions per chunk: the float32 logits alive at once are [CHUNK_TOKENS, vocab]
# Below this many logits (32 MB of float32) one plain pass is cheaper than chunking with a
# recomputing backward: the demo's 2,048-token head on a DPO batch stays under it, a 49k
# vocabulary on a few hundred positions does not.
DIRECT_LOGITS = 1 << 23


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(h W^T)[target] per position, chunk by chunk, recomputing the logits in backward.

    Neither pass keeps more than one chunk of logits: the backward of a [N, V] log-softmax
    would otherwise hold the whole float32 [N, V] matrix (GBs for a 49k vocabulary).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                logits = (hidden[s:s + chunk].to(dtype) @ w.T).float()
                out[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(ctx.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s:s + ctx.chunk].to(ctx.dtype)
                logits = (h @ w.T).float()
                g = grad_out[s:s + ctx.chunk].float()
                # d/dlogits of (logit[target] - logsumexp) = onehot(target) - softmax
                grad_logits = torch.softmax(logits, -1).mul_(-g[:, None])
                grad_logits.scatter_add_(1, targets[s:s + ctx.chunk, None], g[:, None])
                if need_h:
                    grad_h[s:s + ctx.chunk] = (grad_logits.to(ctx.dtype) @ w).to(hidden.dtype)
                if need_w:
                    grad_w += grad_logits.T @ h.float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def selective_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(targets | hidden) through the head `weight` [V, H], float32, without full logits.

    hidden [..., H] (a model's final normed hidden states, `model(ids, return_hidden=True)`),
    targets [...] -> [...]. Equal to token_logprobs(hidden @ weight.T, targets), gradients
    included, in a fraction of the memory. Under autocast the matmuls run in its dtype.
    Small heads (DIRECT_LOGITS) take one plain pass; chunk_tokens forces the chunked one.
    """
    shape = targets.shape
    if chunk_tokens is None and targets.numel() * weight.shape[0] <= DIRECT_LOGITS:
        dtype = _compute_dtype(hidden)
        logits = (hidden.reshape(-1, hidden.shape[-1]).to(dtype) @ weight.to(dtype).T).float()
        flat = targets.reshape(-1, 1)
        return (logits.gather(1, flat).squeeze(1) - logits.logsumexp(-1)).view(shape)
    out = _SelectiveLogSoftmax.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                     chunk_tokens or CHUNK_TOKENS, _compute_dtype(hidden))
    return out.view(shape)


def sequence_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                                  loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logprobs computed from hidden states and the head's weight, chunked (same shift)."""
    targets, mask = _shifted(input_ids, loss_mask)
    keep = mask.bool()  # only counted positions go through the head (prompt tokens cost nothing)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(keep)[keep]
    per_token = selective_logprobs(hidden[keep], weight, targets[keep])
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, per_token)
    return sums, mask.sum(dim=1).long()


def lm_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                        loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """lm_loss computed from hidden states and the head's weight, chunked (same definition)."""
    sum_logps, counts = sequence_logprobs_from_hidden(hidden, weight, input_ids, loss_mask)
    n_tokens = counts.sum()
    return -sum_logps.sum() / n_tokens.clamp(min=1), n_tokens
