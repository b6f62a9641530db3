"""Loss aggregation: how a per-token loss `[B, T]` becomes the scalar that is backpropagated.

The choice matters for GRPO. `token-mean` (DAPO) weighs every token equally, so long responses
count more. `seq-mean-token-mean` (the original GRPO) averages each response first, so every
response counts the same and a token of a long response counts less: that biases the policy
towards long wrong answers and short right ones. `seq-mean-token-sum-norm` (Dr.GRPO) divides each
response's token sum by one constant (the max response length, or a given number), removing the
length bias while keeping a loss scale that does not depend on the batch.

`denom` lets a trainer that splits a batch into micro-batches divide by the *batch's* token or
sequence count, so that the micro-batch losses add up to the loss of the whole batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from miles_core.rl.masking import as_bool, masked_count, masked_sum

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate_loss(
    loss: Tensor,
    mask: Tensor,
    mode: AggMode = "token-mean",
    norm: float | None = None,
    denom: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    loss: [B, T] float, any value on padding; mask: [B, T] bool/float, True = real token.
    mode:
      token-mean              sum(loss) / num_tokens
      seq-mean-token-mean     sum_i(sum_t loss_it / len_i) / num_seqs
      seq-mean-token-sum-norm sum_i(sum_t loss_it / norm) / num_seqs, norm = `norm` or T
    num_tokens counts masked tokens, num_seqs the sequences with at least one token; `denom`
    replaces either count (a global count across micro-batches). Returns a 0-dim tensor, 0 when
    the mask is empty.
    """
    m = as_bool(mask)
    if mode == "token-mean":
        total = masked_sum(loss, m)
        count = masked_count(m) if denom is None else denom
        return total / torch.as_tensor(count, dtype=loss.dtype, device=loss.device).clamp(min=1)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")
    token_sum = masked_sum(loss, m, dim=-1)  # [B]
    lengths = masked_count(m, dim=-1)  # [B] int64
    if mode == "seq-mean-token-mean":
        per_seq = token_sum / lengths.to(loss.dtype).clamp(min=1)  # [B]
    else:
        per_seq = token_sum / (float(m.shape[-1]) if norm is None else float(norm))  # [B]
    count = (lengths > 0).sum() if denom is None else denom
    return per_seq.sum() / torch.as_tensor(count, dtype=loss.dtype, device=loss.device).clamp(min=1)
