"""FP8 (e4m3) block quantization: 128x128 weight blocks and 1x128 dynamic activation tiles.

This is the DeepSeek-V3 recipe, and the numbers every other FP8 path in miles must reproduce:

- weights: one fp32 scale per 128x128 block, `scale_inv = amax(block) / 448`, stored as
  `weight_scale_inv` [ceil(out/128), ceil(in/128)]; `q = clamp(w / scale_inv, +-448)` cast to
  float8_e4m3fn (round to nearest even); dequant `w ~= q * scale_inv`. An all-zero block gets
  `scale_inv = 1` (its q is all zero either way, and no 0/0 appears).
- activations: one fp32 scale per row and 128 columns, computed on the fly (`activation_scheme:
  dynamic`), `scale = max(amax, 1e-10) / 448`.
- optional power-of-two scales (`pow2=True`): `scale_inv = 2^ceil(log2(amax / 448))`, so that
  rescaling is exact in any precision (the UE8M0 habit of DeepSeek-V3.1 / Blackwell recipes).

Edges not multiple of 128 form partial blocks (the scale grid rounds up). NaN/inf inputs raise a
`MilesError` instead of saturating silently: a checkpoint with an inf in it is a bug upstream.
"""

from __future__ import annotations

import torch

from miles_core.errors import MilesError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128
ACT_EPS = 1e-10  # floor on an activation tile's amax (an all-zero tile then quantizes to zeros)

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "BLOCK",
    "check_finite",
    "fp8_block_quantize",
    "fp8_block_dequantize",
    "fp8_act_quantize_reference",
    "fp8_act_dequantize",
    "TILE_ROWS",
    "tile_fp8_weights",
    "untile_fp8_weights",
    "tiles_fit",
]

TILE_ROWS = 64  # rows of a weight box in `tile_fp8_weights`' layout (one wgmma M slice)


def tiles_fit(w: torch.Tensor) -> bool:
    """[..., N, K] e4m3 weights can be stored in `tile_fp8_weights`' layout: N a multiple of 64, K of 128."""
    return w.shape[-2] % TILE_ROWS == 0 and w.shape[-1] % BLOCK == 0


def tile_fp8_weights(w: torch.Tensor) -> torch.Tensor:
    """[E, N, K] -> the same bytes and shape, stored as boxes of 64 rows x one 128-wide K block (8 KB of e4m3),
    box-major: the flat view [-1, 128] has row n's K block kb at row ((e * N + n) // 64 * K / 128 + kb) * 64 +
    n % 64. The GPU's expert GEMMs then stream each box as one contiguous run (bench/RESULTS.md, eighteenth
    session). N a multiple of 64, K of 128 (`tiles_fit`)."""
    if w.dim() != 3 or not tiles_fit(w):
        raise ValueError(f"tile_fp8_weights needs [E, N, K] with N a multiple of {TILE_ROWS} and K of {BLOCK}, "
                         f"got {tuple(w.shape)}")  # fmt: skip
    e, n, k = w.shape
    return w.view(e, n // TILE_ROWS, TILE_ROWS, k // BLOCK, BLOCK).transpose(2, 3).contiguous().view(e, n, k)


def untile_fp8_weights(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `tile_fp8_weights`: [E, N, K] in the checkpoint's row-major layout."""
    e, n, k = t.shape
    return t.view(e, n // TILE_ROWS, k // BLOCK, TILE_ROWS, BLOCK).transpose(2, 3).contiguous().view(e, n, k)


def check_finite(t: torch.Tensor, what: str = "tensor") -> None:
    """Raise a MilesError when `t` holds a NaN or an inf (quantization would hide it)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise MilesError(f"{what} has {n_bad} NaN/inf values; refusing to quantize (fix the source weights)")


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # t: [..., r, c] -> [..., rows, cols] zero-padded at the end
    pr, pc = rows - t.shape[-2], cols - t.shape[-1]
    return torch.nn.functional.pad(t, (0, pc, 0, pr)) if (pr or pc) else t


def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(x)))


def fp8_block_quantize(
    w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK), pow2: bool = False, what: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., out, in] float -> (q [..., out, in] float8_e4m3fn, scale_inv [..., ceil(out/bm), ceil(in/bn)] fp32)."""
    check_finite(w, what)
    bm, bn = block
    *lead, r, c = w.shape
    gr, gc = -(-r // bm), -(-c // bn)
    wf = _pad_to(w.float(), gr * bm, gc * bn).reshape(*lead, gr, bm, gc, bn)  # [..., gr, bm, gc, bn]
    amax = wf.abs().amax(dim=(-3, -1))  # [..., gr, gc]
    scale_inv = amax / FP8_MAX
    if pow2:
        scale_inv = _pow2_ceil(scale_inv)
    scale_inv = torch.where(amax > 0, scale_inv, torch.ones_like(scale_inv))
    q = (wf / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(*lead, gr * bm, gc * bn)[..., :r, :c].to(FP8_DTYPE)
    return q.contiguous(), scale_inv.contiguous()


def fp8_block_dequantize(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """q: [..., out, in] fp8, scale_inv: [..., gr, gc] fp32 -> [..., out, in] in `dtype` (computed in fp32).

    The block edge comes from the grid: 128 when ceil(n / 128) matches it (the DeepSeek-V3 default).
    """
    *_, r, c = q.shape
    gr, gc = scale_inv.shape[-2:]
    bm, bn = block if block is not None else (_block_from_grid(r, gr), _block_from_grid(c, gc))
    if -(-r // bm) != gr or -(-c // bn) != gc:
        raise MilesError(f"scale grid {gr}x{gc} does not match a {r}x{c} weight in {bm}x{bn} blocks")
    s = scale_inv.float().repeat_interleave(bm, dim=-2).repeat_interleave(bn, dim=-1)[..., :r, :c]
    return (q.float() * s).to(dtype)


def _block_from_grid(n: int, g: int) -> int:
    # The block edge b with ceil(n / b) == g; 128 when it fits (the DeepSeek-V3 default).
    if g == -(-n // BLOCK):
        return BLOCK
    b = -(-n // g)
    if -(-n // b) != g:
        raise MilesError(f"scale grid of {g} blocks does not fit a dimension of {n}")
    return b


def fp8_act_quantize_reference(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (q [M, K] fp8, scale [M, ceil(K/block)] fp32): the 1x128 dynamic activation recipe."""
    m, k = x.shape
    g = -(-k // block)
    xf = torch.nn.functional.pad(x.float(), (0, g * block - k)).view(m, g, block)  # [M, g, block]
    amax = xf.abs().amax(-1).clamp_min(ACT_EPS)  # [M, g]
    scale = amax / FP8_MAX
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, g * block)[:, :k].to(FP8_DTYPE)
    return q.contiguous(), scale


def fp8_act_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """q: [M, K] fp8, scale: [M, ceil(K/block)] -> [M, K] fp32."""
    k = q.shape[1]
    return q.float() * scale.float().repeat_interleave(block, dim=1)[:, :k]
