"""W4A16 linear layers: y = x @ dequant(W)^T, W symmetric int4 in groups along K, packed 8 per int32
(compressed-tensors layout, see miles_core/quant/int4.py), x in bf16.

Why a custom kernel: at decode sizes (M = 1..64) a bf16 GEMM is bound by reading the weights, so a
kernel that reads 4-bit weights and dequantizes them in registers can approach 4x. The Triton kernel
(quant_triton.w4a16_kernel) does that; measured on an H100 (bench/RESULTS.md, CUDA graphs) it
reaches 1.85x bf16 at M=1 and 1.28x at M=16 on a 14336x4096 weight, about 2x above the int4 floor.
Above `MAX_M` rows the weights are dequantized into a bf16 matrix for cuBLAS instead (at M=256 the
kernel is already 0.4x of bf16: for prefill, dequantize once and keep the bf16 copy).

The `*_reference` functions dequantize exactly (fp32) and matmul in fp32: the CPU path and the
definition the GPU tests hold the kernels to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from miles_core.kernels.fp8_gemm import _cdiv, expert_tiles, load_triton_kernels, triton_next_pow2
from miles_core.quant.int4 import int4_group_dequantize, unpack_int4

__all__ = [
    "W4A16Config",
    "MAX_M",
    "dequantize_packed",
    "group_major",
    "w4a16_linear",
    "w4a16_linear_reference",
    "grouped_w4a16_linear",
    "grouped_w4a16_linear_reference",
]

MAX_M = 256  # the Triton kernel's range; beyond it, dequantize + cuBLAS


@dataclass(frozen=True)
class W4A16Config:
    bm: int = 16
    bn: int = 64
    bk: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    unpack: int = 2  # quant_triton._load_int4: 0 reshape, 1 per-column word loads, 2 interleave;
    # 3: w4a16_planes_kernel (activations split into nibble planes), where it applies
    swap: bool = False  # planes kernel, bm >= 16: W as the MMA's M side (y^T = W x^T)


def default_config(m: int, n: int, k: int) -> W4A16Config:
    """Tile sizes by M, from the sweeps of bench/quant.py on an H100 (bench/RESULTS.md, 2026-11-23).

    M = 1 is a GEMV in fp32 FMAs (no tensor cores, no padding of M to 16), split 4 ways along K;
    M <= 16 splits K 4 ways too (timed in CUDA graphs, the decode setting, split-K won on both
    shapes); above, one K pass per program when N alone gives enough programs (>= 192 of 64
    columns), split-K when it does not (N = 4096, K = 14336)."""
    few = _cdiv(n, 64) < 192
    if m == 1:
        return W4A16Config(bm=1, bn=128, bk=128, split_k=4)
    if m <= 16:
        return W4A16Config(bm=16, bn=64, bk=128, split_k=4)
    if m <= 64:
        return W4A16Config(bm=64, bn=64, bk=128, split_k=2 if few else 1)
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
    return x.is_cuda and x.dtype == torch.bfloat16 and group_size % bk == 0


def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias). Triton for bf16 CUDA inputs with M <= MAX_M."""
    k = x.shape[-1]
    n = packed.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cfg = config or default_config(m, n, k)
    cfg = cfg if group_size % cfg.bk == 0 else W4A16Config(**{**cfg.__dict__, "bk": min(cfg.bk, group_size)})
    if not _kernel_ok(x, group_size, cfg.bk) or group_size < 16:
        return w4a16_linear_reference(x, packed, scale, group_size, bias)
    if m > MAX_M:
        w = dequantize_packed(packed, scale, k, group_size, torch.bfloat16)
        return F.linear(x, w, bias)
    y = w4a16_linear_triton(x2, packed, scale, group_size, cfg)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def _planes_ok(cfg: W4A16Config, group_size: int) -> bool:
    # the planes kernel takes one scale per K block, and its tensor-core dots need depth BK/8 >= 16
    return cfg.unpack == 3 and group_size % cfg.bk == 0 and (cfg.bm == 1 or cfg.bk >= 128)


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _tile_locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Split-K tile counters: int32 zeros, made once per device (the kernel leaves them at zero).
    Calls that run concurrently on different streams must not share them (decode runs one stream)."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < tiles:
        locks = _LOCKS[device] = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
    return locks


def w4a16_linear_triton(
    x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int, cfg: W4A16Config
) -> torch.Tensor:
    """The kernel launch alone (any device the Triton backend runs on, the interpreter included).
    x2: [M, K] -> [M, N] in x2.dtype. unpack == 3 runs the planes kernel where it applies."""
    m, k = x2.shape
    n = packed.shape[0]
    x2 = x2.contiguous()
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    planes = _planes_ok(cfg, group_size)
    if cfg.unpack == 3 and not planes:  # same tiles, the general kernel
        cfg = W4A16Config(**{**cfg.__dict__, "unpack": 2})
    grid = (_cdiv(m, cfg.bm), _cdiv(n, cfg.bn), cfg.split_k)
    if cfg.split_k > 1:
        partials = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x2.device)  # no fill needed
        locks = _tile_locks(x2.device, grid[0] * grid[1])
    else:
        partials, locks = y, y  # unused
    kernels = load_triton_kernels()
    kernel = kernels.w4a16_planes_kernel if planes else kernels.w4a16_kernel
    extra = {"SWAP": cfg.swap} if planes else {"UNPACK": cfg.unpack}
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
        BM=cfg.bm,
        BN=cfg.bn,
        BK=cfg.bk,
        SPLIT_K=cfg.split_k,
        EVEN_K=k % (cfg.bk * cfg.split_k) == 0,
        **extra,
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
) -> torch.Tensor:
    """Grouped W4A16 expert GEMM (rows sorted by expert). Triton for bf16 CUDA inputs."""
    m, k = xs.shape
    e, n, _ = packed.shape
    if config is None:  # decode (a few rows per expert) vs prefill tiles, from the bench sweep
        small = m <= 16 * e
        config = W4A16Config(bm=16, bn=64, bk=128) if small else W4A16Config(bm=64, bn=128, bk=64, num_stages=3)
    cfg = (
        config if group_size % config.bk == 0 else W4A16Config(**{**config.__dict__, "bk": min(config.bk, group_size)})
    )
    if not _kernel_ok(xs, group_size, cfg.bk) or group_size < 16:
        return grouped_w4a16_linear_reference(xs, packed, scale, counts, group_size)
    return grouped_w4a16_linear_triton(xs, packed, scale, counts, group_size, cfg)


def grouped_w4a16_linear_triton(
    xs: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    counts: torch.Tensor,
    group_size: int,
    cfg: W4A16Config,
) -> torch.Tensor:
    """The grouped kernel launch alone (any Triton device, the interpreter included)."""
    m, k = xs.shape
    e, n, _ = packed.shape
    y = torch.empty(m, n, dtype=xs.dtype, device=xs.device)
    if m == 0:
        return y
    xs = xs.contiguous()
    tile_end, row_start, c = expert_tiles(counts, cfg.bm)
    grid = (_cdiv(m, cfg.bm) + e, _cdiv(n, cfg.bn))
    load_triton_kernels().grouped_w4a16_kernel[grid](
        xs,
        packed,
        scale,
        y,
        tile_end,
        row_start,
        c,
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
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y
