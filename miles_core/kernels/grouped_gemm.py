"""Grouped GEMM for MoE experts: rows sorted by expert, one weight matrix per expert.

`grouped_linear(x, w, counts)` computes, for each expert e, `x[rows of e] @ w[e].T`, where the rows of
x are already sorted by expert and `counts[e]` says how many belong to e.

- CUDA, bf16/fp16: one `torch._grouped_mm` call (CUTLASS grouped GEMM), no Python loop over experts
  and no host sync: `offs` is the device-side cumulative row count. At decode sizes without
  autograd, `grouped_triton` instead (a weight-streaming Triton kernel; see its docstring).
- Everything else (the CPU path and the reference): a loop over the experts that received rows,
  each a plain `F.linear`. On the CPU a loop is the fastest pure-torch form and keeps fp32 exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_linear_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # x: [N, K] rows sorted by expert; w: [E, M, K]; counts: [E] int -> out [N, M]
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = F.linear(x[start : start + n], w[e])
            start += n
    return out


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and w.dtype == x.dtype
        and hasattr(torch, "_grouped_mm")
        and x.shape[1] % 8 == 0
        and w.shape[1] % 8 == 0
    )


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e].T for rows sorted by expert. Differentiable."""
    from miles_core.kernels import grouped_triton

    if grouped_triton.grouped_triton_ok(x, w):  # decode sizes, inference: a Triton kernel at the copy rate
        return grouped_triton.grouped_linear_triton(x, w, counts)
    if _grouped_mm_ok(x, w):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E] end row of each expert
        # w.transpose(-2, -1): [E, K, M] with K contiguous, the layout the grouped kernel wants.
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return _cat_linear(x, w, counts)
    return grouped_linear_reference(x, w, counts)


def _cat_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    # Autograd-friendly reference (no in-place writes into a preallocated output).
    parts = []
    for e, chunk in enumerate(torch.split(x, counts.tolist())):
        if chunk.shape[0]:
            parts.append(F.linear(chunk, w[e]))
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])
