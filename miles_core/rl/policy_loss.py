"""The clipped policy-gradient loss: PPO clip with clip-higher, dual clip and GSPO's ratio.

`ratio = pi(y_t) / pi_old(y_t)`; the per-token loss is `max(-A * ratio, -A * clip(ratio))`,
so the gradient is zero once the ratio has moved past the trust region in the direction the
advantage pushes it. Options:
  - clip-higher (DAPO): separate `eps_low` and `eps_high`, clip to [1 - eps_low, 1 + eps_high];
    a larger upper bound lets unlikely good tokens grow, against entropy collapse.
  - dual clip: for A < 0 the loss is also capped at `-A * c` (c > 1), so one token whose ratio
    has exploded cannot dominate the batch with an unbounded negative-advantage loss.
  - GSPO (`ratio_level="sequence"`): one ratio per sequence, the geometric mean of its token
    ratios `exp(mean_t log(pi / pi_old))`, used for all its tokens. It is far less noisy than
    token ratios for MoE models, where a routing change moves single tokens a lot; use much
    smaller epsilons with it (GSPO uses 3e-4 / 4e-4).
Off-policy corrections (TIS weights) multiply the per-token loss through `weights`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from miles_core.rl.masking import as_bool, masked_fill_zero, masked_mean

RatioLevel = Literal["token", "sequence"]


class PolicyLoss(NamedTuple):
    """What `ppo_clip_loss` returns; all [B, T], 0/False on padding."""

    loss: Tensor  # [B, T] float, per-token loss (aggregate with `aggregate_loss`)
    ratio: Tensor  # [B, T] float, the ratio used (token or sequence), 1.0 on padding
    clipped: Tensor  # [B, T] bool, the clip bound was active (zero gradient from this token)
    dual_clipped: Tensor  # [B, T] bool, the dual-clip cap was active


def log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: RatioLevel = "token") -> Tensor:
    """log(pi / pi_old) per token, [B, T], exactly 0 on padding.

    logp: [B, T] float (with grad), old_logp: [B, T] float (no grad), mask: [B, T].
    level="sequence": each token gets its sequence's mean log ratio (GSPO), differentiable
    through every token of the sequence.
    """
    m = as_bool(mask)
    lr = masked_fill_zero(logp - old_logp, m)  # [B, T]
    if level == "token":
        return lr
    if level != "sequence":
        raise ValueError(f"unknown ratio level {level!r}; expected 'token' or 'sequence'")
    seq = masked_mean(lr, m, dim=-1)  # [B]
    return masked_fill_zero(seq[:, None].expand_as(lr), m)


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: RatioLevel = "token",
    weights: Tensor | None = None,
) -> PolicyLoss:
    """Per-token PPO clip loss.

    logp, old_logp: [B, T] float; advantages: [B] (one per sequence) or [B, T];
    mask: [B, T] bool/float. eps_high defaults to eps_low (symmetric clip). dual_clip: c > 1 or
    None. weights: optional [B, T] multiplicative per-token weights (e.g. TIS), detached here.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    m = as_bool(mask)
    eps_high = eps_low if eps_high is None else eps_high
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    adv = masked_fill_zero(adv.expand_as(logp), m).detach()  # [B, T]
    ratio = torch.exp(log_ratio(logp, old_logp, m, ratio_level))  # [B, T]
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = (loss_clipped > loss_unclipped) & m
    dual_clipped = torch.zeros_like(m)
    if dual_clip is not None:
        cap = -adv * dual_clip  # [B, T]; only binds for A < 0
        dual_clipped = (adv < 0) & (loss > cap) & m
        loss = torch.where(dual_clipped, cap, loss)
    if weights is not None:
        loss = loss * masked_fill_zero(weights.detach(), m)
    return PolicyLoss(masked_fill_zero(loss, m), ratio, clipped, dual_clipped)
