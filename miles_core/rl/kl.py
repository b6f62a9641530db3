"""KL to a frozen reference policy: Schulman's k1, k2, k3 per-token estimators, and the loss term.

With samples y ~ pi and log r = log pi_ref(y) - log pi(y), KL(pi || pi_ref) is estimated per
token by (http://joschu.net/blog/kl-approx.html):
  k1 = -log r = logp - ref_logp          unbiased, high variance, can be negative
  k2 = (log r)^2 / 2                      biased, low variance; its gradient is the KL gradient
  k3 = (r - 1) - log r                    unbiased, low variance, always >= 0
All three are exactly 0 when logp == ref_logp. A coefficient of 0 means no reference model is
loaded: `kl_loss` then returns 0 without touching `ref_logp` (which may be None).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from miles_core.rl.aggregation import AggMode, aggregate_loss
from miles_core.rl.masking import masked_fill_zero

KLKind = Literal["k1", "k2", "k3"]


def kl_penalty(logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token KL estimate of KL(pi || pi_ref) for tokens sampled from pi.

    logp: [B, T] float, log-probs under pi (the sampling side); ref_logp: [B, T] float;
    mask: [B, T]. Returns [B, T], exactly 0 on padding.
    """
    d = masked_fill_zero(logp - ref_logp, mask)  # [B, T], log(pi / pi_ref); 0 on padding
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        return torch.exp(-d) - 1.0 + d  # exp(0) - 1 + 0 == 0 exactly on padding
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def kl_loss(
    logp: Tensor,
    ref_logp: Tensor | None,
    mask: Tensor,
    coef: float,
    *,
    kind: KLKind = "k3",
    mode: AggMode = "token-mean",
    norm: float | None = None,
    denom: float | Tensor | None = None,
) -> Tensor:
    """coef * aggregated KL penalty, a 0-dim tensor to add to the policy loss (0 if coef == 0).

    Aggregation arguments as `aggregate_loss`; use the policy loss's mode so both scale alike.
    """
    if coef == 0.0:
        return logp.new_zeros(())
    if ref_logp is None:
        raise ValueError("kl_loss with coef != 0 needs ref_logp (log-probs of the reference model)")
    return coef * aggregate_loss(kl_penalty(logp, ref_logp, mask, kind), mask, mode, norm, denom)
