"""Masked reductions over padded response tokens.

Every `miles_core.rl` function takes a `mask` `[B, T]` (bool, or float 0/1) that marks the real
response tokens of a right-padded batch. Padding may hold any value, even inf or NaN (a log-prob
of a pad token, a garbage advantage), so values are *selected* with `torch.where` and never
multiplied by the mask: `0 * inf` is NaN, and a NaN in the forward or backward pass of one pad
token would poison the whole step. Every reduction over an empty mask returns 0, not NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool(mask: Tensor) -> Tensor:
    """A bool view of a mask given as bool or float/int 0/1 (nonzero = real token)."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_fill_zero(x: Tensor, mask: Tensor) -> Tensor:
    """`x` where `mask`, exactly 0 elsewhere; no gradient reaches the masked-out entries."""
    return torch.where(as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over `mask` (all of it, or along `dim`)."""
    z = masked_fill_zero(x, mask)
    return z.sum() if dim is None else z.sum(dim)


def masked_count(mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of selected entries (int64), all of it or along `dim`."""
    m = as_bool(mask)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over `mask`; 0 where nothing is selected."""
    m = as_bool(mask).expand_as(x)
    count = masked_count(m, dim).to(x.dtype)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max of `x` over `mask` (a scalar); 0 on an empty mask."""
    m = as_bool(mask).expand_as(x)
    if not bool(m.any()):
        return x.new_zeros(())
    return x[m].max()


def masked_min(x: Tensor, mask: Tensor) -> Tensor:
    """Min of `x` over `mask` (a scalar); 0 on an empty mask."""
    m = as_bool(mask).expand_as(x)
    if not bool(m.any()):
        return x.new_zeros(())
    return x[m].min()


def masked_std(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Std of `x` over `mask` (a scalar); 0 with fewer than 2 entries when unbiased."""
    m = as_bool(mask).expand_as(x)
    n = masked_count(m).to(x.dtype)
    centered = masked_fill_zero(x - masked_mean(x, m), m)
    dof = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    return (centered.square().sum() / dof).sqrt()
