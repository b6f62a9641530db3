"""FP8 block-scaled linear layers: y = x @ W^T with W in e4m3 128x128 blocks, x quantized on the fly
in 1x128 tiles (the DeepSeek-V3 recipe, see miles_core/quant/fp8.py).

- `fp8_linear`: on CUDA, a Triton activation-quant kernel then cuBLAS's block-scaled FP8 GEMM
  (`F.scaled_mm` / `torch._scaled_mm`, 1x128 x 128x128 recipe). On an H100 (bench/RESULTS.md) the
  cuBLAS call runs at 1.51-1.61x a bf16 GEMM and the whole layer at 1.43-1.56x: the activation pass
  costs its bytes, which only fusing it into the producer of x would save. cuBLAS refuses fast
  accumulation for block scales; per-tensor scales reach 1.7-1.9x (a coarser recipe).
  cuBLAS wants the activation scales column-major with M padded to a multiple of 4 and the
  weight's K-block count padded to a multiple of 4; the quant kernel writes that layout directly.
  At decode sizes (M <= `DENSE_TRITON_MAX_M`) cuBLAS loses: 64 rows spent ~10 us per projection in
  `scaled_mm` plus ~3 us of act-quant (bench/RESULTS.md, "Rollout decode"), more than the bf16 GEMM.
  There the act-quant kernel feeds a Triton GEMM (`fp8_dense_kernel`, tiles by `dense_fp8_config`) that
  splits K only as far as one wave of programs; the kernel can also quantize x itself (bitwise the
  same), which ran slower on an H200. The rollout engine fuses an attention's q/k/v into one of them.
- `grouped_fp8_linear`: MoE experts (rows sorted by expert), a Triton grouped kernel whose programs find
  their expert from `counts` alone (no prep launches); at decode sizes (`grouped_fp8_config`, up to
  `FUSED_QUANT_MAX_M` rows) it quantizes the activations itself (no act-quant launch), with the weights
  on the MMA's M side since experts get a few rows each.
- `grouped_fp8_experts`: the whole SwiGLU expert MLP in four launches, the MoE's row gather folded
  into the act-quant (`fp8_act_quant_triton(x, src=...)`) and SwiGLU into the second act-quant
  (`swiglu_fp8_quant_triton`; or into the gate_up GEMM's epilogue, `SWIGLU_EPILOGUE`, measured slower);
  in the engine's fused layer loop the norm before the MoE quantizes the token rows (`add_rms_norm(
  quant=True)`) and the gate_up GEMM gathers them: three launches. The unfused chain's bits
  (`QuantExperts` on CUDA, `kernels.EXPERT_FUSION`).
- The `*_reference` functions are the pure-torch definition (dequantize, then matmul in fp32);
  they are the CPU path and what the GPU tests compare against.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from miles_core.kernels import fp8_wgmma
from miles_core.quant.fp8 import (
    ACT_EPS,
    BLOCK,
    FP8_DTYPE,
    fp8_act_dequantize,
    fp8_act_quantize_reference,
    fp8_block_dequantize,
    untile_fp8_weights,
)

__all__ = [
    "DENSE_TRITON_MAX_M",
    "FUSED_QUANT_MAX_M",
    "Fp8Config",
    "load_triton_kernels",
    "fp8_act_quant",
    "fp8_linear",
    "fp8_dense_triton",
    "dense_fp8_config",
    "dense_takes_fp8_rows",
    "grouped_fp8_config",
    "fp8_linear_reference",
    "prepare_weight_scale",
    "grouped_fp8_linear",
    "grouped_fp8_linear_reference",
    "expert_tiles",
    "swiglu_fp8_quant_triton",
    "grouped_fp8_experts",
    "experts_fusion_ok",
    "GLUON_GROUPED_MIN_M",
]


# Thresholds on M (rows), to be tuned on the device with `bench/quant.py --only decode`.
DENSE_TRITON_MAX_M = 128  # fp8_linear: the dense Triton kernel (act-quant first) up to here, act-quant + cuBLAS above
DECODE_GROUPED_MAX_M = 2048  # grouped FP8: the 16-row swapped tiles up to here (decode), 64 x 128 above
SWIGLU_EPILOGUE = False  # grouped_fp8_experts at decode: SwiGLU + act-quant in the gate_up GEMM's epilogue.
# Off: it needs 128-wide tiles (a program holds the gate and up columns of whole 1x128 output tiles), which
# stream slower than the 64-wide ones: on an H200 at batch 64 the gate_up with the epilogue ran 102.7-104.6
# us against 101.3-101.9 for the 64-wide GEMM + the SwiGLU-quant launch (bench/RESULTS.md).
FUSED_QUANT_MAX_M = 0  # grouped FP8: activations quantized inside the GEMM up to this many rows (when experts
# get ~16 rows or fewer); above, the act-quant kernel + the GEMM on fp8 rows. Off: on an H200 the fused
# 16-row tiles ran 327 us against 113 unfused on a batch-64 gate_up (bench/RESULTS.md): each N tile redoes
# the quantization (one IEEE division per element: MUFU.RCP, FCHK and ~5 FFMA), which the weights'
# stream does not hide.


@dataclass(frozen=True)
class Fp8Config:
    """Tiles of the Triton FP8 GEMMs (BK is 128, the scale block; bn divides 128)."""

    bm: int = 64
    bn: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # dense kernel only: K split over programs, reduced in-kernel in split order
    swap: bool = False  # weights on the MMA's M side (y^T = W x^T): wgmma for a few rows (bm as its N)
    fuse: bool = False  # quantize the activations inside the GEMM (else the act-quant kernel first)
    nfast: bool = False  # grouped kernel: a row tile's N tiles launched side by side (A reused from L2)
    ku: int = 1  # K blocks of 128 per loop iteration (1 or 2; the same bits either way).
    # 2 was no faster on an H200: decode gate_up 101.8 vs 101.9 us, down 55.9 vs 54.5; prefill 0.73-0.89x
    # of bf16 against 0.95-1.01x (bench/RESULTS.md)


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


def fp8_act_quant_triton(
    x: torch.Tensor,
    pad_rows_to: int = 1,
    col_major_scale: bool = False,
    src: torch.Tensor | None = None,
    tiles: tuple[int, int, bool] | None = None,
):
    """The kernel launch alone (any Triton device, the interpreter included). `src` [M] (int32/int64):
    quantize the rows x[src] (x: [T, K]) read in place, the bits of `fp8_act_quant_triton(x[src])`.
    `tiles` (rows per program, warps, K blocks on the grid's fast axis): `act_quant_tiles` by size."""
    m, k = x.shape if src is None else (src.shape[0], x.shape[1])
    mp = _cdiv(m, pad_rows_to) * pad_rows_to
    kb = _cdiv(k, BLOCK)
    x = x if x.stride(-1) == 1 else x.contiguous()
    q = torch.empty(mp, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(kb, mp, device=x.device).t() if col_major_scale else torch.empty(mp, kb, device=x.device)
    if mp == 0:
        return q, s
    bm, warps, kfast = tiles or act_quant_tiles(mp)
    kfast = kfast and _cdiv(mp, bm) <= 65535  # the grid's second axis is limited
    grid = (kb, _cdiv(mp, bm)) if kfast else (_cdiv(mp, bm), kb)
    load_triton_kernels().fp8_act_quant_kernel[grid](
        x, q, s, src if src is not None else x, m, mp, k, x.stride(0), q.stride(0), s.stride(0), s.stride(1),
        ACT_EPS, BM=bm, BLOCK=BLOCK, GATHER=src is not None, KFAST=kfast, num_warps=warps,
    )  # fmt: skip
    return q, s


def act_quant_tiles(m: int) -> tuple[int, int, bool]:
    """(rows per program, warps, K blocks on the grid's fast axis) of the act-quant kernel for M rows.

    H200 sweep (`bench/quant.py --only fp8 --sweep`, 2026-12-02): 16 rows and 4 warps throughout; the
    K-fast order 2-5% faster from 4096 rows (8192 x 8192: 58.9 us = 3.45 TB/s against 60.9-62.0); 32 or 64
    rows and 8 warps no better. Decode sizes keep the order they were timed with."""
    return 16, 4, m >= 1024


def swiglu_fp8_quant_triton(y: torch.Tensor):
    """y: [M, 2I] (gate columns, then up) -> (q [M, I] fp8, scale [M, ceil(I/128)] fp32), the bits of
    `fp8_act_quant_triton(swiglu(y))` in one launch (any Triton device, the interpreter included)."""
    m, n = y.shape[0], y.shape[1] // 2
    y = y if y.stride(-1) == 1 else y.contiguous()
    q = torch.empty(m, n, dtype=FP8_DTYPE, device=y.device)
    s = torch.empty(m, _cdiv(n, BLOCK), device=y.device)
    if m == 0:
        return q, s
    bm = 16
    load_triton_kernels().swiglu_fp8_quant_kernel[(_cdiv(m, bm), _cdiv(n, BLOCK))](
        y, q, s, m, n, y.stride(0), q.stride(0), s.stride(0), ACT_EPS, BM=bm, BLOCK=BLOCK
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
    backend: str = "auto",
    xq: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) with FP8 block-scaled W. `scale_b`: prepare_weight_scale(scale_inv), cached.
    `xq` = (q [M, K] e4m3, scale [M, KB] fp32): x's rows already quantized as `fp8_act_quant` does (by the
    kernel that wrote x: `dense_takes_fp8_rows` says where that pays); the small-M Triton path then reads them
    instead of quantizing x (the same bits), the other paths ignore them.

    backend 'auto' (default): the fused dense Triton kernel for M <= DENSE_TRITON_MAX_M, act-quant +
    cuBLAS above (the Gluon GEMM from GLUON_MIN_TILES output tiles on sm_90, `kernels.FP8_GLUON`); 'cublas': cuBLAS at
    every M; 'triton': Triton at every M (above the threshold,
    act-quant + the dense kernel on fp8 rows). Triton also wherever cuBLAS's recipe does not apply
    (N or K not a multiple of 128, before sm_90)."""
    if backend not in ("auto", "cublas", "triton"):
        raise ValueError(f"unknown FP8 GEMM backend {backend!r}; use 'auto', 'cublas' or 'triton'")
    if not x.is_cuda:
        return fp8_linear_reference(x, w, scale_inv, bias)
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    m, (n, k) = x2.shape[0], w.shape
    small = m <= DENSE_TRITON_MAX_M and _decode_fusion()
    if _scaled_mm_ok(x, w) and (backend == "cublas" or (backend == "auto" and not small)):
        y = _fp8_linear_cublas(x2, w, scale_inv, scale_b, gluon=backend == "auto")
    else:
        xq = xq if small and xq is not None and xq[0].shape == x2.shape else None
        y = fp8_dense_triton(x2, w, scale_inv, dense_fp8_config(m, n, k) if small else Fp8Config(), xq=xq)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def dense_takes_fp8_rows(rows: int, w: torch.Tensor) -> bool:
    """`fp8_linear(x, w, ..., xq=...)` over `rows` rows of x would read them pre-quantized ('auto' backend):
    CUDA, decode sizes (M <= DENSE_TRITON_MAX_M, `kernels.DECODE_FUSION`), where the act-quant launch is the
    Triton kernel's."""
    return w.is_cuda and w.dtype == FP8_DTYPE and rows <= DENSE_TRITON_MAX_M and _decode_fusion()


def _fp8_linear_cublas(
    x2: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, scale_b=None, gluon: bool = False
) -> torch.Tensor:
    """x2: [M, K] -> [M, N]: the Triton act-quant kernel, then cuBLAS's block-scaled GEMM (or with `gluon`, from
    GLUON_MIN_TILES 128 x 256 output tiles in bf16 on sm_90, `fp8_wgmma.fp8_block_gemm` on the same operands:
    the same recipe)."""
    m = x2.shape[0]
    a, sa = fp8_act_quant(x2, pad_rows_to=4, col_major_scale=True)  # [M4, K], [M4, KB] strides (1, M4)
    out_dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.float32
    tiles = _cdiv(m, 128) * _cdiv(w.shape[0], 256)
    if gluon and tiles >= GLUON_MIN_TILES and out_dtype == torch.bfloat16 and _gluon_ok(x2):
        y = _fp8_gluon(a, sa, w, scale_inv)
        if y is not None:
            return y[:m]
    sb = scale_b if scale_b is not None else prepare_weight_scale(scale_inv)
    return _scaled_mm(a, w.t(), sa, sb, out_dtype)[:m]  # w.t(): [K, N] column-major, as cuBLAS wants


# output tiles (128 x 256) from which FP8 linears take the Gluon GEMM: its persistent grid is measured from 512
# tiles (4096 x 4096) up; below a few waves of 132 SMs cuBLAS's tile choices were not compared
GLUON_MIN_TILES = 512


def _gluon_ok(x2: torch.Tensor) -> bool:
    from miles_core import kernels

    return kernels.FP8_GLUON and torch.cuda.get_device_capability(x2.device) == (9, 0)


def _fp8_gluon(a, sa, w, scale_inv) -> torch.Tensor | None:
    """`fp8_wgmma.fp8_block_gemm`, or None (with one warning, and `kernels.FP8_GLUON` set False) where it does
    not compile: Gluon is experimental and may not build on another Triton."""
    from miles_core import kernels

    try:
        return fp8_wgmma.fp8_block_gemm(a, sa, w, scale_inv)
    except Exception as exc:  # a compile failure falls back to cuBLAS
        if torch.cuda.is_current_stream_capturing():
            raise
        kernels.FP8_GLUON = False
        warnings.warn(f"FP8 Gluon GEMM unavailable, using cuBLAS: {type(exc).__name__}: {exc}", stacklevel=4)
        return None


# rows from which `grouped_fp8_experts` runs its two GEMMs on `fp8_wgmma_grouped` (sm_90, `kernels.FP8_GLUON`): on
# an H200 in CUDA graphs (Qwen3-30B-A3B experts, bench/RESULTS.md, seventeenth session) it beat the Triton grouped
# kernel at 4,096 rows (gate_up 111.4 against 125.2 us, down 64.5 against 67.6) and at 16,384 (163.0 / 96.1 against
# 247.8 / 137.0), and by 1.35-1.42x at a prefill chunk's 262k rows (twelfth session)
GLUON_GROUPED_MIN_M = 4096
# rows from which (up to GLUON_GROUPED_MIN_M) the two GEMMs run on `fp8_wgmma_decode` (weights on wgmma's M side,
# 3 CTAs per SM): at 2,048 rows (batch 256 x top-8) gate_up 103.0 us against the Triton kernel's 113.0, down 56.4
# against 58.5; at 512 rows a tie on gate_up (95.5 / 96.7) and slower on down (52.2 / 50.5), which the row gather
# it needs first would not pay for; from 4,096 rows slower than `fp8_wgmma_grouped` (seventeenth session)
DECODE_GLUON_MIN_M = 2048
_GLUON_GROUPED_FAILED = False


def _grouped_experts_gluon(m, x, counts, w1, s1, w2, s2, src, xq, tiled=False) -> torch.Tensor | None:
    """`grouped_fp8_experts` over m rows with both GEMMs on a Gluon grouped kernel (`fp8_wgmma_decode` below
    GLUON_GROUPED_MIN_M rows, else `fp8_wgmma_grouped`): the rows gathered and quantized first (TMA reads
    contiguous rows, so the GEMM cannot gather them), bf16 gate_up, SwiGLU + act-quant, down. None (with one
    warning, never trying again) where the kernel does not compile or take the shapes."""
    global _GLUON_GROUPED_FAILED
    from miles_core.kernels import fp8_wgmma_decode, fp8_wgmma_grouped

    gemm = fp8_wgmma_grouped.grouped_fp8_block_gemm
    if m < GLUON_GROUPED_MIN_M:
        gemm = fp8_wgmma_decode.grouped_fp8_decode_gemm

    try:
        if xq is not None and src is not None:  # token rows quantized by the norm: gather them (bytes, not values)
            a, sa = xq[0].view(torch.uint8).index_select(0, src).view(FP8_DTYPE), xq[1].index_select(0, src)
        elif xq is not None:
            a, sa = xq
        else:
            a, sa = fp8_act_quant_triton(x, pad_rows_to=4, col_major_scale=True, src=src)
        y = gemm(a[:m], sa, w1, s1, counts, tiled=tiled)  # [M, 2I] bf16
        a, sa = swiglu_fp8_quant_triton(y)  # [M, I] e4m3, [M, I/128] fp32
        return gemm(a, sa, w2, s2, counts, tiled=tiled)  # [M, H] bf16
    except Exception as exc:
        if torch.cuda.is_current_stream_capturing():
            raise
        _GLUON_GROUPED_FAILED = True
        warnings.warn(f"FP8 Gluon grouped GEMM unavailable, using Triton: {type(exc).__name__}: {exc}", stacklevel=3)
        return None


def _decode_fusion() -> bool:
    """The decode-size paths follow `kernels.DECODE_FUSION` (bench/rollout.py --unfused turns them off)."""
    from miles_core import kernels

    return kernels.DECODE_FUSION


def split_for(tiles: int, k_blocks: int, target: int) -> int:
    """The largest power-of-two split-K with tiles * split <= target programs and >= 2 K blocks per split."""
    split = 1
    while tiles * split * 2 <= target and split * 2 <= max(1, k_blocks // 2):
        split *= 2
    return split


def dense_fp8_config(m: int, n: int, k: int) -> Fp8Config:
    """Tiles of the dense kernel at decode sizes.

    A decode GEMM reads each weight once and little else, so the grid must spread the weights over the
    SMs. Up to 16 rows: the weights on wgmma's M side, the rows as its N (a 64-row M tile would be mostly
    padding), split-K to about 160 programs. More rows: 64 x 64 tiles with 4 warps and 4 stages, split-K
    only while the programs stay within ~128 (one wave): on an H200 at M = 64 (bench/RESULTS.md, seventh
    session) the fused q/k/v shape (5120 x 2048) took 8.3 us unsplit + 2.3 us of act-quant, against 18.2
    with the previous 64 x 128 / 8 warps / split-4 tiles, and o_proj (2048 x 4096) 8.5 us at split 4 +
    2.7, against 16.9."""
    if m <= 16:
        bn = 128 if _cdiv(n, 128) >= 16 else 64
        split = split_for(_cdiv(n, bn), _cdiv(k, BLOCK), 160)
        return Fp8Config(bm=16, bn=bn, num_warps=4, num_stages=4, split_k=split, swap=True, fuse=False)
    split = split_for(_cdiv(m, 64) * _cdiv(n, 64), _cdiv(k, BLOCK), 128)
    return Fp8Config(bm=64, bn=64, num_warps=4, num_stages=4, split_k=split, swap=False, fuse=False)


_LOCKS: dict[torch.device, torch.Tensor] = {}


def tile_locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Split-K tile counters: int32 zeros, made once per device (the kernels leave them at zero).
    Calls that run concurrently on different streams must not share them (decode runs one stream)."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < tiles:
        locks = _LOCKS[device] = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
    return locks


def fp8_dense_triton(
    x2: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, cfg: Fp8Config, xq=None, out_dtype=None
) -> torch.Tensor:
    """The dense kernel launch alone (any Triton device, the interpreter included). x2: [M, K] -> [M, N] in
    x2.dtype. cfg.fuse: one launch; else act-quant first. Both give the same bits for the same cfg.
    `xq` = (q [M, K] e4m3, scale [M, KB] fp32): x2's rows already quantized as `fp8_act_quant_triton` does
    (by the norm that made them): no act-quant launch, x2 unread (may be q itself); output in `out_dtype`."""
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=out_dtype or x2.dtype, device=x2.device)
    if m == 0:
        return y
    if xq is not None:
        a, sa = xq
    else:
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        a, sa = (x2, x2) if cfg.fuse else fp8_act_quant_triton(x2)  # [M, K]; [M, KB] fp32 (unused when fused)
    kb_per_split = _cdiv(_cdiv(k, BLOCK), cfg.split_k)
    grid = (_cdiv(m, cfg.bm), _cdiv(n, cfg.bn), cfg.split_k)
    if cfg.split_k > 1:
        partials = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x2.device)  # no fill needed
        locks = tile_locks(x2.device, grid[0] * grid[1])
    else:
        partials, locks = y, y  # unused
    load_triton_kernels().fp8_dense_kernel[grid](
        a, sa, w, scale_inv, y, partials, locks, m, n, k, kb_per_split,
        a.stride(0), sa.stride(0), w.stride(0), scale_inv.stride(0), y.stride(0), ACT_EPS,
        BM=cfg.bm, BN=cfg.bn, BK=BLOCK, SPLIT_K=cfg.split_k, EVEN_K=k % BLOCK == 0, QUANT=cfg.fuse, SWAP=cfg.swap,
        KU=cfg.ku, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def expert_tiles(counts: torch.Tensor, bm: int):
    """counts [E] -> (tile_end [E] int32 cumulative tile counts, row_start [E] int32, counts int32).
    The tables the grouped kernels read before they computed their tile map themselves; kept for
    `prep=True` (benchmarking the previous path)."""
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


def grouped_fp8_config(m: int, e: int) -> Fp8Config:
    """Tiles of the grouped kernel by size (decode choices by reasoning; tune with the bench's sweep).

    Decode (at most FUSED_QUANT_MAX_M rows and ~16 per expert: batch 64 gives 512 rows over 128
    experts, 4 each): the activations quantized in the GEMM, 16-row tiles with the weights on wgmma's M
    side (a 64-row tile would be mostly padding, which the fused quantization pays for in full).
    Each of the N / 128 column tiles redoes its rows' quantization, which the weight stream hides only
    while rows per expert are few. Else act-quant first and the 64 x 128 tiles of the eager sweep, launched
    N tiles first (`nfast`)."""
    if m <= FUSED_QUANT_MAX_M and m <= 16 * e and _decode_fusion():
        return Fp8Config(bm=16, bn=128, num_warps=4, num_stages=4, swap=True, fuse=True)
    if m <= DECODE_GROUPED_MAX_M and m <= 16 * e and _decode_fusion():
        # act-quant first, 16-row tiles with the weights on wgmma's M side: on an H200 at 512 rows,
        # 102.9 / 55.0 us (gate_up / down) against 111.7 / 63.4 for 64 x 128 (bench/decode_kernels.py)
        return Fp8Config(bm=16, bn=64, num_warps=4, num_stages=3, swap=True)
    # prefill: a row tile's N tiles side by side, its activations read once from HBM (H200, rollout prefill
    # chunk of 32k tokens x top-8: gate_up 2.80 ms vs 3.34 in the other launch order; bench/quant.py)
    return Fp8Config(bm=64, bn=128, num_warps=4, num_stages=3, nfast=True)


def grouped_fp8_linear(
    xs: torch.Tensor,
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    counts: torch.Tensor,
    bm: int | None = None,
    bn: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    fuse: bool | None = None,
    swap: bool | None = None,
    nfast: bool | None = None,
    ku: int | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """Grouped FP8 expert GEMM: rows of xs sorted by expert (`counts` [E], int32 or int64); Triton on
    CUDA. Tiles by size (`grouped_fp8_config`) unless given. `tiled`: w in `quant.fp8.tile_fp8_weights`' layout."""
    if not xs.is_cuda:
        return grouped_fp8_linear_reference(xs, untile_fp8_weights(w) if tiled else w, scale_inv, counts)
    given = dict(bm=bm, bn=bn, num_warps=num_warps, num_stages=num_stages, fuse=fuse, swap=swap, nfast=nfast, ku=ku)
    cfg = replace(grouped_fp8_config(xs.shape[0], w.shape[0]), **{k: v for k, v in given.items() if v is not None})
    return grouped_fp8_linear_triton(
        xs, w, scale_inv, counts, cfg.bm, cfg.bn, cfg.num_warps, cfg.num_stages, fuse=cfg.fuse, swap=cfg.swap,
        nfast=cfg.nfast, ku=cfg.ku, tiled=tiled,
    )  # fmt: skip


def grouped_fp8_linear_triton(
    xs: torch.Tensor,
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    counts: torch.Tensor,
    bm: int = 64,
    bn: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
    fuse: bool = False,
    swap: bool = False,
    prep: bool = False,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    nfast: bool = False,
    ku: int = 1,
    src: torch.Tensor | None = None,
    swiglu_quant: bool = False,
    tiled: bool = False,
):
    """The grouped kernel launch alone (any Triton device, the interpreter included). `fuse`: the
    activations quantized in the kernel (one launch; the same bits as act-quant first). `prep`: the
    previous path's tile tables (`expert_tiles`, five small launches), for benchmarks. `x_scale`: xs is
    already quantized (e4m3 [M, K] and x_scale [M, KB] fp32, as `fp8_act_quant_triton` gives them), the
    output `out_dtype`. `nfast`: the grid's fast axis walks N tiles, `ku`: K blocks per iteration (see
    `Fp8Config`). `src` [M] (with `x_scale`): xs [T, K] are token rows and sorted row r reads xs[src[r]]
    in the kernel (no gathered copy). `swiglu_quant` (w: [E, 2I, K] gate rows then up rows, bn == 128):
    -> (q [M, I] e4m3, scale [M, I/128] fp32), SwiGLU and its act-quant in the epilogue, the bits of this
    GEMM (in `out_dtype`) then `swiglu_fp8_quant_triton`; else -> y [M, N]. `tiled`: w in
    `quant.fp8.tile_fp8_weights`' layout (K a multiple of 128, N of 64): the same bits."""
    if tiled and (xs.shape[1] % BLOCK or w.shape[1] % 64):
        raise ValueError(f"tiled weights need K a multiple of {BLOCK} and N of 64, got {tuple(w.shape)}")
    if swiglu_quant and (bn != BLOCK or w.shape[1] % (2 * BLOCK)):
        raise ValueError(f"swiglu_quant needs bn == {BLOCK} and I a multiple of {BLOCK}; got bn={bn}, 2I={w.shape[1]}")
    if ku not in (1, 2):
        raise ValueError(f"ku must be 1 or 2 (K blocks per loop iteration), got {ku}")
    if src is not None and x_scale is None:
        raise ValueError("src (the kernel's row gather) needs pre-quantized rows (x_scale)")
    k = xs.shape[1]
    m = xs.shape[0] if src is None else src.shape[0]
    e, n, _ = w.shape
    out_dtype = out_dtype or xs.dtype
    if swiglu_quant:
        y = torch.empty(m, n // 2, dtype=torch.float8_e4m3fn, device=xs.device)
        ys = torch.empty(m, n // 2 // BLOCK, dtype=torch.float32, device=xs.device)
    else:
        y, ys = torch.empty(m, n, dtype=out_dtype, device=xs.device), None
    if m == 0:
        return (y, ys) if swiglu_quant else y
    xs = xs if xs.stride(-1) == 1 else xs.contiguous()
    if x_scale is not None:
        a, sa, fuse = xs, x_scale, False
    else:  # [M, K]; [M, KB] fp32 (unused when fused)
        a, sa = (xs, xs) if fuse else fp8_act_quant_triton(xs)
    tile_end, row_start, c = expert_tiles(counts, bm) if prep else (counts, counts, counts)
    grid = (_cdiv(m, bm) + e, _cdiv(n // 2 if swiglu_quant else n, bn))
    grid = grid[::-1] if nfast else grid
    swiglu = dict(YS=ys, stride_ysm=ys.stride(0), SWIGLU_DT=_tl_dtype(out_dtype)) if swiglu_quant else {}
    load_triton_kernels().grouped_fp8_kernel[grid](
        a, sa, w, scale_inv, y, tile_end, row_start, c, e, n, k,
        a.stride(0), sa.stride(0), w.stride(0), w.stride(1), scale_inv.stride(0), scale_inv.stride(1), y.stride(0),
        ACT_EPS, E_P2=triton_next_pow2(e), BM=bm, BN=bn, BK=BLOCK, EVEN_K=k % BLOCK == 0,
        QUANT=fuse, SWAP=swap, PREP=prep, NFAST=nfast, KU=ku, SRC=src, GATHER=src is not None, TILED=tiled, **swiglu,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return (y, ys) if swiglu_quant else y


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def experts_fusion_ok(x: torch.Tensor, rows: int, n_experts: int) -> bool:
    """`grouped_fp8_experts` applies: CUDA, `kernels.DECODE_FUSION` and `EXPERT_FUSION` on, and the
    grouped tiles for this size quantize in the act-quant kernel (not inside the GEMM)."""
    from miles_core import kernels

    return kernels.EXPERT_FUSION and x.is_cuda and _decode_fusion() and not grouped_fp8_config(rows, n_experts).fuse


def grouped_fp8_experts(x, counts, w1, s1, w2, s2, src=None, xq=None, tiled: bool = False) -> torch.Tensor:
    """SwiGLU experts on FP8 weights in four launches: act-quant of the rows x[src] -> gate_up ->
    SwiGLU + act-quant -> down. x: [T, H] token rows (without `src`: [M, H] rows sorted by expert);
    w1 [E, 2I, H], w2 [E, H, I] e4m3 with scale_inv s1, s2; counts [E] -> [M, H] in x.dtype.
    `xq` = (q [T, H] e4m3, scale [T, H/128] fp32), x's rows already quantized as `fp8_act_quant` does
    (by the norm before the MoE, `add_norm.add_rms_norm(quant=True)`): one launch fewer, the gate_up GEMM
    reading q[src] in place. `SWIGLU_EPILOGUE`: SwiGLU + act-quant in the gate_up GEMM's epilogue. `tiled`: w1
    and w2 in `quant.fp8.tile_fp8_weights`' layout (every kernel below reads it; the same bits).

    Below DECODE_GLUON_MIN_M rows (or off sm_90): the bits of index_select -> grouped_fp8_linear -> swiglu ->
    grouped_fp8_linear (act-quant first, the same tiles), without the gathered copy of x, the [M, I] SwiGLU
    output and two launches. From there the GEMMs run on the Gluon grouped kernels (`_grouped_experts_gluon`:
    the same quantized operands, fp32 accumulation in another order)."""
    m = x.shape[0] if src is None else src.shape[0]
    if m >= DECODE_GLUON_MIN_M and x.dtype == torch.bfloat16 and not _GLUON_GROUPED_FAILED and _gluon_ok(x):
        y = _grouped_experts_gluon(m, x, counts, w1, s1, w2, s2, src, xq, tiled)
        if y is not None:
            return y
    cfg = grouped_fp8_config(m, w1.shape[0])
    tiles = dict(bm=cfg.bm, bn=cfg.bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages, swap=cfg.swap, ku=cfg.ku)
    tiles["tiled"] = tiled
    if xq is not None and src is not None:  # token rows quantized already: the GEMM gathers them
        a, sa, gather = xq[0], xq[1], src
    else:
        a, sa = fp8_act_quant_triton(x, src=src) if xq is None else xq  # [M, H] e4m3, [M, H/128] fp32
        gather = None
    if SWIGLU_EPILOGUE and cfg.swap and (w1.shape[1] // 2) % BLOCK == 0:  # [M, I] e4m3, [M, I/128] fp32
        wide = {**tiles, "bn": BLOCK}  # gate and up columns of one 1x128 output tile per program
        a, sa = grouped_fp8_linear_triton(
            a, w1, s1, counts, x_scale=sa, out_dtype=x.dtype, src=gather, swiglu_quant=True, **wide
        )
    else:
        y = grouped_fp8_linear_triton(a, w1, s1, counts, x_scale=sa, out_dtype=x.dtype, src=gather, **tiles)  # [M, 2I]
        a, sa = swiglu_fp8_quant_triton(y)  # [M, I] e4m3, [M, I/128] fp32
    return grouped_fp8_linear_triton(a, w2, s2, counts, x_scale=sa, out_dtype=x.dtype, **tiles)  # [M, H]
