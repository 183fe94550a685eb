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
