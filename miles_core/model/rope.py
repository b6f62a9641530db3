"""Rotary position embeddings: default, linear, llama3 and YaRN frequency schedules.

Formulas follow the published methods (RoFormer; Llama 3.1's smooth low/high-frequency blend;
YaRN, arXiv:2309.00071, with DeepSeek's mscale) so that cos/sin match transformers' values to
float32 rounding. Angles are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import math

import torch

from miles_core.model.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [rope_dim/2] float32, attention_factor applied to cos/sin)."""
    rp = cfg.rope
    dim, base = cfg.rope_dim, float(rp["rope_theta"])
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # [dim/2]
    inv_freq = 1.0 / (base**exponents)
    kind = rp["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rp["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rp), 1.0
    return _yarn(cfg, dim, base)


def _llama3(inv_freq: torch.Tensor, rp: dict) -> torch.Tensor:
    factor, lo, hi = float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
    old_len = float(rp["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(medium, blended, scaled)


def _yarn(cfg: ModelConfig, dim: int, base: float) -> tuple[torch.Tensor, float]:
    rp = cfg.rope
    orig = rp["original_max_position_embeddings"]
    factor = rp.get("factor") or cfg.max_position_embeddings / orig
    factor = float(factor)
    attn_factor = rp.get("attention_factor")
    if attn_factor is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attn_factor = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # 1 where the original frequencies are kept
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """Attention logit scale. MLA with YaRN multiplies 1/sqrt(d) by mscale(factor, mscale_all_dim)^2."""
    scale = cfg.head_dim**-0.5
    rp = cfg.rope
    if cfg.attention == "mla" and rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
        m = _yarn_mscale(float(rp["factor"]), rp["mscale_all_dim"])
        scale = scale * m * m
    return scale


class Rotary(torch.nn.Module):
    """Produces cos/sin [B, T, rope_dim] for given positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = inverse_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, T] int -> angles [B, T, dim/2] in float32
        angles = positions.float()[..., None] * self.inv_freq.float().to(positions.device)
        emb = torch.cat([angles, angles], dim=-1)  # [B, T, dim]
        cos = (emb.cos() * self.attention_factor).to(dtype)
        sin = (emb.sin() * self.attention_factor).to(dtype)
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [B, T, heads, dim] by cos/sin [B, T, dim].

    `interleaved` (DeepSeek) pairs dims (0,1), (2,3), ... and returns them de-interleaved
    (evens then odds); q and k get the same permutation, so their dot products are unchanged.
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if not interleaved:
        return x * cos + _rotate_half(x) * sin
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * c - odd * s, odd * c + even * s], dim=-1)
