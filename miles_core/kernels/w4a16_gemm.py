"""W4A16 linear layers: y = x @ dequant(W)^T, W symmetric int4 in groups along K, packed 8 per int32
(compressed-tensors layout, see miles_core/quant/int4.py), x in bf16.

Why custom kernels: at decode sizes (M = 1..64) a bf16 GEMM is bound by reading the weights, so a
kernel that reads 4-bit weights and dequantizes them in registers can approach 4x. M = 1 runs
quant_triton.w4a16_gemv_kernel (int4 -> fp32 by magic numbers: a shift, one LOP3 and the FMA per
weight); 2-32 rows (`MMA_MAX_ROWS`) with group 128 run kernels.w4a16_mma (Gluon: the dequantized weights
reach mma.sync without shared memory); other M > 1 run quant_triton.w4a16_kernel on tensor cores. All split
K with a one-launch reduction (the last split of a tile sums the partials). Measured against bf16 cuBLAS in
CUDA graphs: bench/RESULTS.md, "Quantized GEMMs". Above `MAX_M` rows the weights are dequantized into a bf16
matrix (`dequantize_packed_triton`, one launch) for cuBLAS instead: from ~256 rows that is faster than the
kernels (0.34x of bf16 at 256 rows); for long prefills, dequantize once and keep the bf16 copy.

Weights come in the checkpoint's rows layout ([N, K/8]) or, with group 128, repacked into column tiles
(`w4a16_mma.repack_tiles`, what `Int4Linear` stores): every kernel here reads both with the same bits, and
the tiles read faster at 2-64 rows (sixteenth session: 1.60-1.85x of bf16 at 2-16 rows against 1.46-1.69x).

The `*_reference` functions dequantize exactly (fp32) and matmul in fp32: the CPU path and the
definition the GPU tests hold the kernels to.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from miles_core import kernels
from miles_core.kernels import w4a16_mma
from miles_core.kernels.fp8_gemm import (
    _cdiv,
    expert_tiles,
    load_triton_kernels,
    split_for,
    tile_locks,
    triton_next_pow2,
)
from miles_core.quant.int4 import int4_group_dequantize, unpack_int4

__all__ = [
    "W4A16Config",
    "MAX_M",
    "dequantize_packed",
    "dequantize_packed_triton",
    "group_major",
    "w4a16_linear",
    "w4a16_linear_reference",
    "grouped_w4a16_linear",
    "grouped_w4a16_linear_reference",
]

MAX_M = 128  # the Triton kernels' range; beyond it, dequantize (one Triton launch) + cuBLAS
MMA_MAX_ROWS = 32  # the Gluon kernel's range in w4a16_linear (at 64 rows the Triton kernel is faster)


@dataclass(frozen=True)
class W4A16Config:
    bm: int = 16
    bn: int = 64
    bk: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    unpack: int = 2  # quant_triton._load_int4: 0 reshape, 1 per-column word loads, 2 interleave,
    # 4 magic numbers (bm == 1: w4a16_gemv_kernel, where bk may also be a multiple of the group)
    swap: bool = False  # bm >= 16: W as the MMA's M side (y^T = W x^T)
    prefetch: bool = False  # gemv kernel: the next K step's weights loaded before this step's math


def default_config(m: int, n: int, k: int, tiled: bool = False) -> W4A16Config:
    """Tile sizes by M, from the CUDA-graph sweeps of bench/quant.py on an H100 (bench/RESULTS.md).

    M = 1: the GEMV kernel (magic-number dequant, fp32 FMAs). Narrow N: one warp per program, 32 columns,
    K steps of 256 with the next step prefetched, split-K to about 1,000 programs. Wide N (from 12,288
    columns): 16 columns x K steps of 2,048 (1 KB of each row per step), 4 warps, no split: on an H200 the
    14336 x 4096 GEMV took 13.9 us against 15.4-15.5 with the previous 64 x 256 tiles split 4 ways
    (`bench/exp_w4a16_gemv.py --long`; long row stretches also read fastest in its `--probe`).
    M <= 16: tensor cores, split-K to about 900 programs. M <= 64: magic-number dequant, split-K only
    when N gives few programs. 65-128 rows (sixteenth session, H200): split 2 where N gives few programs,
    else 64 x 128 tiles (72.5 / 65.3 us at 128 rows against 153 / 71 before). Prefill sizes go to cuBLAS past
    MAX_M. `tiled`: the weights in `w4a16_mma.repack_tiles`' layout, where the GEMV reads 32 columns x 512 K
    per step (2 warps, split-K to ~512 programs: 14.3 / 14.6 us against 14.8 / 14.8 with the rows layout's
    tiles) and wide N at 33-64 rows takes 64 x 128 tiles split 2 (`bench/exp_w4a16_gemv.py --tiled-sweep`)."""
    few = _cdiv(n, 64) < 192
    if m == 1 and tiled:
        split = split_for(_cdiv(n, 32), _cdiv(k, 512), 512)
        return W4A16Config(bm=1, bn=32, bk=512, split_k=split, num_warps=2, num_stages=1, unpack=4, prefetch=True)
    if m == 1 and few:
        split = split_for(_cdiv(n, 32), _cdiv(k, 256), 1024)
        return W4A16Config(bm=1, bn=32, bk=256, split_k=split, num_warps=1, num_stages=1, unpack=4, prefetch=True)
    if m == 1:  # K steps of up to 2,048 (no longer than K rounded up to a power of two)
        bk = min(2048, max(256, triton_next_pow2(k)))
        return W4A16Config(bm=1, bn=16, bk=bk, split_k=1, num_warps=4, num_stages=1, unpack=4)
    if m <= 16:
        split = split_for(_cdiv(n, 64), _cdiv(k, 128), 900)
        return W4A16Config(bm=16, bn=64, bk=128, split_k=split, num_stages=3)
    if m <= 64 and tiled and not few:
        return W4A16Config(bm=64, bn=128, bk=128, split_k=2, num_stages=3, unpack=2)
    if m <= 64:
        return W4A16Config(bm=64, bn=64, bk=128, split_k=4 if few else 1, unpack=4)
    if m <= 128 and few:
        return W4A16Config(bm=64, bn=64, bk=128, split_k=2, num_stages=3, unpack=2)
    if m <= 128:
        return W4A16Config(bm=64, bn=128, bk=128, num_stages=4, unpack=4)
    if few:
        return W4A16Config(bm=128, bn=64, bk=128, num_stages=3)
    return W4A16Config(bm=64, bn=128, bk=128, num_stages=3)


def group_major(scale: torch.Tensor) -> torch.Tensor:
    """The same scales ([..., N, G]) stored group-major (strides (..., 1, N)), the layout the kernels
    read fastest: one group's N scales are contiguous, so each K step loads them in one 16-byte
    vectorized, pipelined load instead of N scattered 2-byte ones. Compute once per weight."""
    return scale.transpose(-1, -2).contiguous().transpose(-1, -2)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, k: int, group_size: int, dtype=torch.float32):
    """packed: [..., N, ceil(K/8)] int32, scale: [..., N, ceil(K/g)] -> [..., N, K] dense weights."""
    return int4_group_dequantize(unpack_int4(packed, k), scale, group_size, dtype)


def dequantize_packed_triton(
    packed: torch.Tensor, scale: torch.Tensor, k: int, group_size: int, dtype=torch.bfloat16
) -> torch.Tensor:
    """`dequantize_packed` (the same bits) in one Triton launch, for one weight: packed [N, ceil(K/8)] or
    `w4a16_mma.repack_tiles(packed, bt)`, scale [N, ceil(K/g)] -> [N, K]. On an H200 a 4096 x 14336 weight
    takes ~40 us here against ~1 ms for the torch ops (bench/exp_w4a16_gemv.py --tiled-sweep), which made
    the > MAX_M rows' dequantize + cuBLAS path slower than the kernels it stood in for."""
    tiled = packed.dim() == 4
    n, bt = (packed.shape[0] * packed.shape[2], packed.shape[2]) if tiled else (packed.shape[0], 0)
    if tiled and (group_size != 128 or k % 128):
        raise ValueError(f"repacked INT4 tiles need group 128 and K a multiple of 128, got {group_size}, {k}")
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    bn, bk = 32, 256
    load_triton_kernels().int4_dequant_kernel[(_cdiv(n, bn), _cdiv(k, bk))](
        packed,
        scale,
        out,
        n,
        k,
        packed.stride(0),
        scale.stride(0),
        scale.stride(1),
        out.stride(0),
        GROUP=group_size,
        BN=bn,
        BK=bk,
        ASM=_asm_ok(packed),
        EVEN_K=k % bk == 0,
        BT=bt,
        num_warps=4,
    )
    return out


def w4a16_linear_reference(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [..., K] -> [..., N] in x.dtype, computed in fp32 on exactly dequantized weights."""
    w = dequantize_packed(packed, scale, x.shape[-1], group_size)  # [N, K] fp32
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _kernel_ok(x: torch.Tensor, group_size: int, bk: int) -> bool:
    # K steps of a power of two that divides the group or that the group divides (the GEMV kernel)
    steps_fit = group_size % bk == 0 or bk % group_size == 0
    return x.is_cuda and x.dtype == torch.bfloat16 and steps_fit and bk & (bk - 1) == 0


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias). Triton for bf16 CUDA inputs with M <= MAX_M. `packed`: [N, K/8] int32,
    or with group 128 `w4a16_mma.repack_tiles(packed, bt)` [N/bt, K/128, bt, 16], which every kernel here
    reads (the same bits) and the tensor-core kernel reads fastest (bench/RESULTS.md, "Quantized GEMMs")."""
    k = x.shape[-1]
    tiled = packed.dim() == 4
    n = packed.shape[0] * packed.shape[2] if tiled else packed.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if config is None and 2 <= m <= MMA_MAX_ROWS and _mma_ok(x2, packed, group_size):
        y = _w4a16_mma(x2, packed, scale, n, k)
        if y is not None:
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], n)
    cfg = config or default_config(m, n, k, tiled)
    if group_size % cfg.bk and not _gemv_ok(cfg, group_size):
        cfg = W4A16Config(**{**cfg.__dict__, "bk": min(cfg.bk, group_size)})
    rows = w4a16_mma.unpack_tiles if tiled else lambda p: p
    if not _kernel_ok(x, group_size, cfg.bk) or group_size < 16:
        return w4a16_linear_reference(x, rows(packed), scale, group_size, bias)
    if m > MAX_M:
        w = dequantize_packed_triton(packed, scale, k, group_size, torch.bfloat16)
        return F.linear(x, w, bias)
    y = w4a16_linear_triton(x2, packed, scale, group_size, cfg)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def _mma_ok(x2: torch.Tensor, packed: torch.Tensor, group_size: int) -> bool:
    # the Gluon tensor-core kernel: compiled CUDA only (Gluon has no interpreter), bf16, group 128
    if not kernels.W4A16_MMA or not _asm_ok(x2) or packed.dtype != torch.int32:
        return False
    return w4a16_mma.mma_ok(x2, packed, group_size)


def _w4a16_mma(x2, packed, scale, n: int, k: int) -> torch.Tensor | None:
    """The Gluon kernel, or None (with one warning, and `kernels.W4A16_MMA` set False) where it fails to
    compile: Gluon is experimental and may not build on another Triton."""
    bn = packed.shape[2] if packed.dim() == 4 else 64  # repacked tiles: their width is the program's
    cfg = {**w4a16_mma.mma_config(n, k, x2.shape[0], bn), "bn": bn}
    try:
        return w4a16_mma.w4a16_mma(x2.contiguous(), packed, scale, **cfg)
    except Exception as exc:  # any compile failure falls back to the Triton kernels
        if torch.cuda.is_current_stream_capturing():
            raise
        kernels.W4A16_MMA = False
        msg = f"W4A16 Gluon kernel unavailable, using the Triton kernels: {type(exc).__name__}: {exc}"
        warnings.warn(msg, stacklevel=3)
        return None


def _gemv_ok(cfg: W4A16Config, group_size: int) -> bool:
    # the GEMV kernel takes K steps of a divisor or a multiple of the group
    return cfg.bm == 1 and cfg.unpack == 4 and (group_size % cfg.bk == 0 or cfg.bk % group_size == 0)


def _asm_ok(x: torch.Tensor) -> bool:
    # the kernels' inline PTX only where they are compiled for CUDA (not under the interpreter)
    return x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


def w4a16_linear_triton(
    x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int, cfg: W4A16Config
) -> torch.Tensor:
    """The kernel launch alone (any device the Triton backend runs on, the interpreter included).
    x2: [M, K] -> [M, N] in x2.dtype. bm == 1 with unpack == 4 runs the GEMV kernel. `packed` may also be
    `w4a16_mma.repack_tiles(packed, bt)` [N/bt, K/128, bt, 16] (group 128, K steps of whole groups, unpack
    0, 2 or 4): the same bits."""
    m, k = x2.shape
    tiled = packed.dim() == 4
    n, bt = (packed.shape[0] * packed.shape[2], packed.shape[2]) if tiled else (packed.shape[0], 0)
    if tiled and not (group_size == 128 and cfg.bk % 128 == 0 and k % 128 == 0 and cfg.unpack != 1):
        raise ValueError(f"repacked INT4 tiles need group 128, K steps of 128s and unpack 0, 2 or 4: {cfg}")
    gemv = _gemv_ok(cfg, group_size)
    if not gemv and group_size % cfg.bk:  # the tensor-core kernel scales per K step: one group at most
        raise ValueError(f"K steps of {cfg.bk} across groups of {group_size} need the GEMV (bm 1, unpack 4)")
    x2 = x2.contiguous()
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (_cdiv(m, cfg.bm), _cdiv(n, cfg.bn), cfg.split_k)
    if cfg.split_k > 1:
        partials = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x2.device)  # no fill needed
        locks = tile_locks(x2.device, grid[0] * grid[1])
    else:
        partials, locks = y, y  # unused
    kernels = load_triton_kernels()
    if gemv:
        kernel, extra = kernels.w4a16_gemv_kernel, {"PREFETCH": cfg.prefetch, "STAGES": cfg.num_stages, "BT": bt}
    else:
        kernel, extra = kernels.w4a16_kernel, {"BM": cfg.bm, "UNPACK": cfg.unpack, "SWAP": cfg.swap, "BT": bt}
    kernel[grid](
        x2,
        packed,
        scale,
        y,
        partials,
        locks,
        m,
        n,
        k,
        _cdiv(_cdiv(k, cfg.bk), cfg.split_k),
        x2.stride(0),
        packed.stride(0),
        scale.stride(0),
        scale.stride(1),
        y.stride(0),
        GROUP=group_size,
        BN=cfg.bn,
        BK=cfg.bk,
        SPLIT_K=cfg.split_k,
        EVEN_K=k % (cfg.bk * cfg.split_k) == 0,
        **extra,
        ASM=_asm_ok(x2),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y


def grouped_w4a16_linear_reference(
    xs: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, counts: torch.Tensor, group_size: int
) -> torch.Tensor:
    """xs: [M, K] rows sorted by expert; packed [E, N, K/8]; scale [E, N, K/g]; counts [E] -> [M, N]."""
    out = xs.new_empty(xs.shape[0], packed.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = w4a16_linear_reference(xs[start : start + n], packed[e], scale[e], group_size)
            start += n
    return out


def grouped_w4a16_linear(
    xs: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    counts: torch.Tensor,
    group_size: int,
    config: W4A16Config | None = None,
    src: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped W4A16 expert GEMM (rows sorted by expert). Triton for bf16 CUDA inputs. `src` [M]: the rows
    are xs[src] (xs: [T, K] token rows), read in place by the kernel (`kernels.EXPERT_FUSION`)."""
    from miles_core import kernels

    m, k = xs.shape if src is None else (src.shape[0], xs.shape[1])
    e, n, _ = packed.shape
    if config is None:  # decode (a few rows per expert) vs prefill tiles, from the bench sweep
        small = m <= 16 * e
        config = W4A16Config(bm=16, bn=64, bk=128) if small else W4A16Config(bm=64, bn=128, bk=64, num_stages=3)
    cfg = (
        config if group_size % config.bk == 0 else W4A16Config(**{**config.__dict__, "bk": min(config.bk, group_size)})
    )
    kernel = _kernel_ok(xs, group_size, cfg.bk) and group_size >= 16
    if src is not None and not (kernel and kernels.DECODE_FUSION and kernels.EXPERT_FUSION):
        xs, src = xs.index_select(0, src), None
    if not kernel:
        return grouped_w4a16_linear_reference(xs, packed, scale, counts, group_size)
    return grouped_w4a16_linear_triton(xs, packed, scale, counts, group_size, cfg, src=src)


def grouped_w4a16_linear_triton(
    xs: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    counts: torch.Tensor,
    group_size: int,
    cfg: W4A16Config,
    prep: bool = False,
    src: torch.Tensor | None = None,
) -> torch.Tensor:
    """The grouped kernel launch alone (any Triton device, the interpreter included). The programs find
    their expert from `counts` ([E], int32 or int64) themselves; `prep`: the previous path's tile tables
    (`expert_tiles`, five small launches), for benchmarks; `src` [M]: the rows xs[src], read in place."""
    m, k = xs.shape if src is None else (src.shape[0], xs.shape[1])
    e, n, _ = packed.shape
    y = torch.empty(m, n, dtype=xs.dtype, device=xs.device)
    if m == 0:
        return y
    xs = xs if xs.stride(-1) == 1 else xs.contiguous()
    tile_end, row_start, c = expert_tiles(counts, cfg.bm) if prep else (counts, counts, counts)
    grid = (_cdiv(m, cfg.bm) + e, _cdiv(n, cfg.bn))
    load_triton_kernels().grouped_w4a16_kernel[grid](
        xs,
        packed,
        scale,
        y,
        tile_end,
        row_start,
        c,
        src if src is not None else c,  # unread without GATHER
        e,
        n,
        k,
        xs.stride(0),
        packed.stride(0),
        packed.stride(1),
        scale.stride(0),
        scale.stride(1),
        scale.stride(2),
        y.stride(0),
        GROUP=group_size,
        E_P2=triton_next_pow2(e),
        BM=cfg.bm,
        BN=cfg.bn,
        BK=cfg.bk,
        EVEN_K=k % cfg.bk == 0,
        UNPACK=cfg.unpack,
        ASM=_asm_ok(xs),
        PREP=prep,
        GATHER=src is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y
