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
and rounds once, as the reference (`grouped_gemm.grouped_linear_reference`) does. Two options fold
the launches around the experts' gate_up GEMM into it (`Experts.sorted_forward` at decode sizes):
- `src`: the A rows are gathered from the token rows (row r is x[src[r]]) as they are loaded, instead
  of an `index_select` launch writing a sorted copy of x first.
- `swiglu`: each program computes a gate tile and the matching up tile and writes silu(gate) * up,
  instead of writing [M, 2I] for the `swiglu` kernel to read back. Bitwise the unfused pair: gate and
  up are rounded to the output dtype, then `swiglu.silu_mul` in fp32, rounded once. Each program reads
  two [BN, BK] weight tiles per K step, so SWIGLU_CONFIG halves BN: the same weight bytes per program
  and the same grid as the unfused gate_up GEMM. The K loop is the same, so the accumulators are too.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton: the pure-torch path is used
    triton = None

__all__ = ["MAX_ROWS", "CONFIG", "SWIGLU_CONFIG", "grouped_linear_triton", "grouped_triton_ok", "fusion_ok"]

MAX_ROWS = 4096  # sorted rows (tokens x top-k) up to which the kernel replaces torch._grouped_mm
CONFIG = dict(BM=16, BN=128, BK=128, num_warps=4, num_stages=3)  # H200 sweep, bench/decode_kernels.py
# swiglu=True: BN gate columns and BN up columns per program (by reasoning: CONFIG's weight bytes per
# program; `bench/decode_kernels.py --only grouped --sweep` times BN 32 / 64 / 128)
SWIGLU_CONFIG = dict(CONFIG, BN=CONFIG["BN"] // 2)


def grouped_triton_ok(x: torch.Tensor, w: torch.Tensor, rows: int | None = None) -> bool:
    """The kernel applies: CUDA 16-bit, decode sizes (`rows` sorted rows, default x's), no autograd."""
    from miles_core import kernels

    rows = x.shape[0] if rows is None else rows
    return (
        kernels.DECODE_FUSION
        and triton is not None
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and w.dtype == x.dtype
        and 0 < rows <= MAX_ROWS
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and w.stride(-1) == 1
    )


def fusion_ok(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    """The gather / SwiGLU options apply: the kernel does, and `kernels.EXPERT_FUSION` is on."""
    from miles_core import kernels

    return kernels.EXPERT_FUSION and grouped_triton_ok(x, w, rows)


if triton is not None:
    from miles_core.kernels.quant_triton import _expert_tile
    from miles_core.kernels.swiglu import silu_mul

    @triton.jit
    def grouped_kernel(
        X,
        W,
        Y,
        COUNTS,
        SRC,
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
        GATHER: tl.constexpr = False,
        SWIGLU: tl.constexpr = False,
    ):
        # X: [M, K] rows sorted by expert, or (GATHER) [T, K] token rows with SRC [M]: sorted row r is
        # X[SRC[r]]. W: [E, N, K], or (SWIGLU) [E, 2N, K] gate rows then up rows; Y: [M, N];
        # COUNTS: [E] rows per expert.
        # The expert and row tile of this program from the counts alone (the FP8 / INT4 kernels' map).
        e, _, r0, r1 = _expert_tile(COUNTS, COUNTS, COUNTS, E, tl.program_id(0), E_P2, BM, False)
        if e >= E:
            return
        rows = r0 + tl.arange(0, BM)
        rmask = rows < r1
        if GATHER:  # the A rows straight from the token rows: no index_select launch, no gathered copy
            x_rows = tl.load(SRC + rows, mask=rmask, other=0)
        else:
            x_rows = rows
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        W += e.to(tl.int64) * stride_we
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if SWIGLU:
            acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = (ks[None, :] < K) | EVEN_K
            x = tl.load(X + x_rows[:, None] * stride_xm + ks[None, :], mask=rmask[:, None] & kmask, other=0.0)
            w = tl.load(W + cols[:, None] * stride_wn + ks[None, :], mask=(cols[:, None] < N) & kmask, other=0.0)
            acc += tl.dot(x, tl.trans(w))
            if SWIGLU:  # the matching up rows, N further on: two [BN, BK] weight tiles per K step
                wu = tl.load(W + (cols[:, None] + N) * stride_wn + ks[None, :], mask=(cols[:, None] < N) & kmask,
                             other=0.0)  # fmt: skip
                acc_up += tl.dot(x, tl.trans(wu))
        if SWIGLU:
            # As the unfused path: the GEMM rounds gate and up to Y's dtype, `swiglu` computes from those
            # in fp32 and rounds once.
            g = acc.to(Y.dtype.element_ty).to(tl.float32)
            u = acc_up.to(Y.dtype.element_ty).to(tl.float32)
            acc = silu_mul(g, u)
        mask = rmask[:, None] & (cols[None, :] < N)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def grouped_linear_triton(
    x: torch.Tensor,
    w: torch.Tensor,
    counts: torch.Tensor,
    config: dict | None = None,
    src: torch.Tensor | None = None,
    swiglu: bool = False,
) -> torch.Tensor:
    """x: [M, K] rows sorted by expert, w: [E, N, K], counts: [E] -> [M, N] in x.dtype (no autograd).

    `src` [M] (int32/int64): the A rows are x[src] (x: [T, K] token rows), read in place. `swiglu`: w is
    a gate_up weight [E, 2I, K] (gate rows, then up) and the output [M, I] is silu(gate) * up, with the
    bits of this kernel's [M, 2I] output followed by `swiglu.swiglu` (tiles from SWIGLU_CONFIG)."""
    cfg = {**(SWIGLU_CONFIG if swiglu else CONFIG), **(config or {})}
    m = x.shape[0] if src is None else src.shape[0]
    k = x.shape[1]
    e, n, _ = w.shape
    n = n // 2 if swiglu else n
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    bm, bn = cfg["BM"], cfg["BN"]
    grid = (-(-m // bm) + e, -(-n // bn))
    grouped_kernel[grid](
        x,
        w,
        y,
        counts,
        src if src is not None else counts,  # unread without GATHER
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
        GATHER=src is not None,
        SWIGLU=swiglu,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y
