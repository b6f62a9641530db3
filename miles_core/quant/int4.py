"""INT4 symmetric group quantization (W4A16) and compressed-tensors' int32 packing.

Quantization, per row and per group of `group_size` input columns (the last group may be short):
- `scale = amax(group) / 7`, rounded to the scale dtype (bf16 by default) *before* it is used, so
  that the stored scale is the one the weights were divided by; an all-zero group gets scale 1;
- `q = clamp(round_half_even(w / scale), -8, 7)` (|w / scale| <= 7 * (1 + 2^-8), so q lands in
  [-7, 7]: no clipping, and |w - q * scale| <= scale / 2);
- dequant `q * scale`, computed in fp32 (exact: a 4-bit integer times an 8-bit-mantissa scale).
  QAT fake-quant (qat.py) calls these same functions, which is why its forward values equal the
  checkpoint's dequantized weights bit for bit.

(compressed-tensors' own observer divides by 7.5 and lets +amax clip to 7; the stored format is
the same: any consumer dequantizes `q * scale`.)

Packing follows compressed-tensors `pack_to_int32` / `unpack_from_int32`
(src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py), the layout vLLM's
`CompressedTensorsWNA16` scheme reads: offset q by +8 to an unsigned nibble, pack 8 consecutive
input columns per int32 with column `8j + i` in bits `4i .. 4i+3` of word j (little-endian
nibbles), pad the column count up to a multiple of 8 with zeros. `weight_packed` is then
[out, ceil(in / 8)] int32, `weight_scale` [out, ceil(in / group)], `weight_shape` = [out, in].
"""

from __future__ import annotations

import torch

from miles_core.errors import MilesError
from miles_core.quant.fp8 import check_finite

PACK = 8  # int4 values per int32
QMAX = 7

__all__ = ["int4_group_quantize", "int4_group_dequantize", "pack_int4", "unpack_int4", "int4_scales"]


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    # w: [..., in] -> [..., ngroups, group_size] fp32, zero-padded
    c = w.shape[-1]
    ng = -(-c // group_size)
    wf = torch.nn.functional.pad(w.float(), (0, ng * group_size - c))
    return wf.view(*w.shape[:-1], ng, group_size)


def int4_scales(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w: [..., in] -> scale [..., ceil(in / group_size)] in scale_dtype (amax / 7; zero groups -> 1)."""
    amax = _grouped(w, group_size).abs().amax(-1)  # [..., ng] fp32
    scale = (amax / QMAX).to(scale_dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def int4_group_quantize(
    w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16, what: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., out, in] float -> (q [..., out, in] int8 in [-8, 7], scale [..., out, ceil(in/g)] scale_dtype)."""
    if group_size <= 0:
        raise MilesError(f"group size must be positive, got {group_size}")
    check_finite(w, what)
    scale = int4_scales(w, group_size, scale_dtype)
    g = _grouped(w, group_size)  # [..., ng, gs]
    q = torch.round(g / scale.float()[..., None]).clamp(-8, QMAX)
    q = q.view(*w.shape[:-1], -1)[..., : w.shape[-1]].to(torch.int8)
    return q.contiguous(), scale


def int4_group_dequantize(
    q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """q: [..., in] int (values in [-8, 7]), scale: [..., ceil(in/g)] -> [..., in] in dtype (fp32 math)."""
    c = q.shape[-1]
    s = scale.float().repeat_interleave(group_size, dim=-1)[..., :c]
    return (q.float() * s).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [..., in] int8 in [-8, 7] -> [..., ceil(in/8)] int32 (compressed-tensors pack_to_int32 order)."""
    if q.dtype != torch.int8:
        raise MilesError(f"pack_int4 takes int8 values in [-8, 7], got {q.dtype}")
    c = q.shape[-1]
    nw = -(-c // PACK)
    u = torch.nn.functional.pad((q.to(torch.int32) + 8), (0, nw * PACK - c))  # unsigned nibbles, padding 0
    u = u.view(*q.shape[:-1], nw, PACK)  # [..., nw, 8]
    shifts = torch.arange(PACK, dtype=torch.int32, device=q.device) * 4
    # Sum of disjoint bit fields == bitwise or; int32 wrap-around of the top nibble is what
    # compressed-tensors stores as well (the int32 is just a container of 32 bits).
    return (u << shifts).sum(-1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, n_cols: int) -> torch.Tensor:
    """packed: [..., ceil(n_cols/8)] int32 -> [..., n_cols] int8 in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise MilesError(f"unpack_int4 takes int32 words, got {packed.dtype}")
    shifts = torch.arange(PACK, dtype=torch.int32, device=packed.device) * 4
    u = (packed[..., None] >> shifts) & 0xF  # [..., nw, 8]
    return (u.flatten(-2)[..., :n_cols] - 8).to(torch.int8).contiguous()
