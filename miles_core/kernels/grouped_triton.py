"""bf16/fp16 grouped GEMM for MoE experts at decode sizes (Triton): rows sorted by expert.

At decode a MoE layer has a few rows per expert (batch 64 x top-8 over 128 experts: ~4), so the
grouped GEMM is a read of every touched expert's weights, nothing more. torch's `_grouped_mm`
(CUTLASS) streamed them at ~2.5-3.0 TB/s on an H200 (bench/RESULTS.md), plus two launches of
its own per call (the offsets' cumsum, the problem-size setup); this kernel at ~4.1-4.2 TB/s for
64-token batches (512 sorted rows), about the device's copy bandwidth, and 3.6 TB/s at 2048 rows. This kernel reads the
per-expert row counts directly: each program finds its expert and row tile from `counts` (a cumsum
over the experts' tile counts, in registers), then streams one [BN, K] slab of that expert's weight
with a software pipeline, small row tiles (BM = 16) so that no bandwidth goes to empty rows.

`grouped_linear_triton(x, w, counts)` computes for each expert e `x[rows of e] @ w[e].T` in fp32
and rounds once, as the reference (`grouped_gemm.grouped_linear_reference`) does.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton: the pure-torch path is used
    triton = None

__all__ = ["MAX_ROWS", "CONFIG", "grouped_linear_triton", "grouped_triton_ok"]

MAX_ROWS = 4096  # sorted rows (tokens x top-k) up to which the kernel replaces torch._grouped_mm
CONFIG = dict(BM=16, BN=128, BK=128, num_warps=4, num_stages=3)  # H200 sweep, bench/decode_kernels.py


def grouped_triton_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    from miles_core import kernels

    return (
        kernels.DECODE_FUSION
        and triton is not None
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and w.dtype == x.dtype
        and 0 < x.shape[0] <= MAX_ROWS
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and w.stride(-1) == 1
    )


if triton is not None:
    from miles_core.kernels.quant_triton import _expert_tile

    @triton.jit
    def grouped_kernel(
        X,
        W,
        Y,
        COUNTS,
        E,
        N,
        K,
        stride_xm,
        stride_we,
        stride_wn,
        stride_ym,
        E_P2: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        # X: [M, K] rows sorted by expert; W: [E, N, K]; Y: [M, N]; COUNTS: [E] rows per expert.
        # The expert and row tile of this program from the counts alone (the FP8 / INT4 kernels' map).
        e, _, r0, r1 = _expert_tile(COUNTS, COUNTS, COUNTS, E, tl.program_id(0), E_P2, BM, False)
        if e >= E:
            return
        rows = r0 + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        W += e.to(tl.int64) * stride_we
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            x = tl.load(
                X + rows[:, None] * stride_xm + ks[None, :],
                mask=(rows[:, None] < r1) & ((ks[None, :] < K) | EVEN_K),
                other=0.0,
            )
            w = tl.load(
                W + cols[:, None] * stride_wn + ks[None, :],
                mask=(cols[:, None] < N) & ((ks[None, :] < K) | EVEN_K),
                other=0.0,
            )
            acc += tl.dot(x, tl.trans(w))
        mask = (rows[:, None] < r1) & (cols[None, :] < N)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def grouped_linear_triton(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, config: dict | None = None):
    """x: [M, K] rows sorted by expert, w: [E, N, K], counts: [E] -> [M, N] in x.dtype (no autograd)."""
    cfg = {**CONFIG, **(config or {})}
    m, k = x.shape
    e, n, _ = w.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm, bn = cfg["BM"], cfg["BN"]
    grid = (-(-m // bm) + e, -(-n // bn))
    grouped_kernel[grid](
        x,
        w,
        y,
        counts,
        e,
        n,
        k,
        x.stride(0),
        w.stride(0),
        w.stride(1),
        y.stride(0),
        E_P2=1 << max(0, (e - 1).bit_length()),
        BM=bm,
        BN=bn,
        BK=cfg["BK"],
        EVEN_K=k % cfg["BK"] == 0,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y
