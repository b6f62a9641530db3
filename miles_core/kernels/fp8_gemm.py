"""FP8 block-scaled linear layers: y = x @ W^T with W in e4m3 128x128 blocks, x quantized on the fly
in 1x128 tiles (the DeepSeek-V3 recipe, see miles_core/quant/fp8.py).

- `fp8_linear`: on CUDA, a Triton activation-quant kernel then cuBLAS's block-scaled FP8 GEMM
  (`F.scaled_mm` / `torch._scaled_mm`, 1x128 x 128x128 recipe). On an H100 (bench/RESULTS.md) the
  cuBLAS call runs at 1.51-1.61x a bf16 GEMM and the whole layer at 1.43-1.56x: the activation pass
  costs its bytes, which only fusing it into the producer of x would save. cuBLAS refuses fast
  accumulation for block scales; per-tensor scales reach 1.7-1.9x (a coarser recipe).
  cuBLAS wants the activation scales column-major with M padded to a multiple of 4 and the
  weight's K-block count padded to a multiple of 4; the quant kernel writes that layout directly.
- `grouped_fp8_linear`: MoE experts (rows sorted by expert), a Triton grouped kernel.
- The `*_reference` functions are the pure-torch definition (dequantize, then matmul in fp32);
  they are the CPU path and what the GPU tests compare against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from miles_core.quant.fp8 import (
    ACT_EPS,
    BLOCK,
    FP8_DTYPE,
    fp8_act_dequantize,
    fp8_act_quantize_reference,
    fp8_block_dequantize,
)

__all__ = [
    "load_triton_kernels",
    "fp8_act_quant",
    "fp8_linear",
    "fp8_linear_reference",
    "prepare_weight_scale",
    "grouped_fp8_linear",
    "grouped_fp8_linear_reference",
    "expert_tiles",
]


@functools.cache
def load_triton_kernels():
    """The Triton kernels module (the one place triton is imported)."""
    from miles_core.kernels import quant_triton

    return quant_triton


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fp8_act_quant(x: torch.Tensor, pad_rows_to: int = 1, col_major_scale: bool = False):
    """x: [M, K] -> (q [M', K] fp8, scale [M', ceil(K/128)] fp32), M' = M rounded up to `pad_rows_to`.

    CUDA: the Triton kernel; else the reference (padding rows are zeros). `col_major_scale` gives
    the scale tensor strides (1, M') (cuBLAS's layout for 1x128 scales).
    """
    if not x.is_cuda:
        mp = _cdiv(x.shape[0], pad_rows_to) * pad_rows_to
        q, s = fp8_act_quantize_reference(F.pad(x, (0, 0, 0, mp - x.shape[0])))
        return q, (s.t().contiguous().t() if col_major_scale else s)
    return fp8_act_quant_triton(x, pad_rows_to, col_major_scale)


def fp8_act_quant_triton(x: torch.Tensor, pad_rows_to: int = 1, col_major_scale: bool = False):
    """The kernel launch alone (any Triton device, the interpreter included)."""
    m, k = x.shape
    mp = _cdiv(m, pad_rows_to) * pad_rows_to
    kb = _cdiv(k, BLOCK)
    x = x.contiguous()
    q = torch.empty(mp, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(kb, mp, device=x.device).t() if col_major_scale else torch.empty(mp, kb, device=x.device)
    bm = 16
    grid = (_cdiv(mp, bm), kb)
    load_triton_kernels().fp8_act_quant_kernel[grid](
        x, q, s, m, mp, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1), ACT_EPS, BM=bm, BLOCK=BLOCK
    )
    return q, s


def prepare_weight_scale(scale_inv: torch.Tensor) -> torch.Tensor:
    """weight_scale_inv [ceil(N/128), KB] -> cuBLAS's 128x128 scale operand [KB4, ceil(N/128)], KB4 = KB
    rounded up to a multiple of 4, column-major (strides (1, KB4)). Compute once per weight."""
    kb = scale_inv.shape[1]
    return F.pad(scale_inv.float(), (0, _cdiv(kb, 4) * 4 - kb)).contiguous().t()


def _scaled_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    n, k = w.shape
    return x.is_cuda and k % BLOCK == 0 and n % BLOCK == 0 and torch.cuda.get_device_capability(x.device) >= (9, 0)


def _scaled_mm(a, b, sa, sb, out_dtype):
    # Layouts as torch's checks for the 1x128 x 128x128 recipe state them (_meta_registrations.py,
    # `_scaled_mm_v2`): scale_a [M, K/128] strides (1, M); scale_b [round_up(K/128, 4), N/128]
    # strides (1, round_up(K/128, 4)). The older `torch._scaled_mm` takes scale_b unpadded.
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        st = F.ScalingType
        return F.scaled_mm(a, b, sa, st.BlockWise1x128, sb, st.BlockWise128x128, output_dtype=out_dtype)
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb[: sa.shape[1]], out_dtype=out_dtype)


def fp8_linear_reference(
    x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [..., K], w: [N, K] fp8, scale_inv: [ceil(N/128), ceil(K/128)] -> [..., N] in x.dtype.

    Activations go through the same 1x128 quantization as on the GPU; the products run in fp32.
    """
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = fp8_act_quantize_reference(x2)
    y = fp8_act_dequantize(xq, xs) @ fp8_block_dequantize(w, scale_inv).t()  # [M, N] fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_b: torch.Tensor | None = None,
    backend: str = "cublas",
) -> torch.Tensor:
    """y = x @ W^T (+ bias) with FP8 block-scaled W. `scale_b`: prepare_weight_scale(scale_inv), cached.

    backend 'cublas' (default) or 'triton' (the grouped kernel with one group: any N, K)."""
    if x.is_cuda and (backend == "triton" or not _scaled_mm_ok(x, w)):
        x2 = x.reshape(-1, x.shape[-1])
        counts = torch.full((1,), x2.shape[0], dtype=torch.int32, device=x.device)
        y = grouped_fp8_linear_triton(x2, w[None], scale_inv[None], counts)
        y = y + bias if bias is not None else y
        return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
    if not x.is_cuda:
        return fp8_linear_reference(x, w, scale_inv, bias)
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    a, sa = fp8_act_quant(x2, pad_rows_to=4, col_major_scale=True)  # [M4, K], [M4, KB] strides (1, M4)
    sb = scale_b if scale_b is not None else prepare_weight_scale(scale_inv)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    y = _scaled_mm(a, w.t(), sa, sb, out_dtype)[:m]  # w.t(): [K, N] column-major, as cuBLAS wants
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def expert_tiles(counts: torch.Tensor, bm: int):
    """counts [E] -> (tile_end [E] int32 cumulative tile counts, row_start [E] int32, counts int32).
    The grid needs ceil(M/bm) + E programs at most: every expert wastes at most one partial tile."""
    c = counts.to(torch.int32)
    tiles = (c + bm - 1) // bm
    return torch.cumsum(tiles, 0, dtype=torch.int32), (torch.cumsum(c, 0, dtype=torch.int32) - c), c


def grouped_fp8_linear_reference(
    xs: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """xs: [M, K] rows sorted by expert, w: [E, N, K] fp8, scale_inv: [E, gN, gK], counts [E] -> [M, N]."""
    out = xs.new_empty(xs.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = fp8_linear_reference(xs[start : start + n], w[e], scale_inv[e])
            start += n
    return out


def grouped_fp8_linear(
    xs: torch.Tensor,
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    counts: torch.Tensor,
    bm: int = 64,
    bn: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Grouped FP8 expert GEMM: rows of xs sorted by expert (`counts` [E]); Triton on CUDA."""
    if not xs.is_cuda:
        return grouped_fp8_linear_reference(xs, w, scale_inv, counts)
    return grouped_fp8_linear_triton(xs, w, scale_inv, counts, bm, bn, num_warps, num_stages)


def grouped_fp8_linear_triton(
    xs: torch.Tensor,
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    counts: torch.Tensor,
    bm: int = 64,
    bn: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """The grouped kernel launch alone (any Triton device, the interpreter included)."""
    m, k = xs.shape
    e, n, _ = w.shape
    a, sa = fp8_act_quant_triton(xs)  # [M, K] fp8, [M, KB] row-major
    y = torch.empty(m, n, dtype=xs.dtype, device=xs.device)
    if m == 0:
        return y
    tile_end, row_start, c = expert_tiles(counts, bm)
    grid = (_cdiv(m, bm) + e, _cdiv(n, bn))
    load_triton_kernels().grouped_fp8_kernel[grid](
        a,
        sa,
        w,
        scale_inv,
        y,
        tile_end,
        row_start,
        c,
        e,
        n,
        k,
        a.stride(0),
        sa.stride(0),
        w.stride(0),
        w.stride(1),
        scale_inv.stride(0),
        scale_inv.stride(1),
        y.stride(0),
        E_P2=triton_next_pow2(e),
        BM=bm,
        BN=bn,
        BK=BLOCK,
        EVEN_K=k % BLOCK == 0,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
