"""Attention: GQA (Llama, Qwen3, Qwen3-MoE; optional q/k RMSNorm) and MLA (DeepSeek-V3).

Both compute through `torch.nn.functional.scaled_dot_product_attention`, which picks the flash /
memory-efficient kernels on CUDA and the math path on the CPU. MLA keeps its compressed latent
(`kv_lora_rank` normed latent + one shared rope key) separate from the up-projection so that a KV
cache can store the latent instead of full per-head K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.model.config import ModelConfig
from miles_core.model.layers import RMSNorm
from miles_core.model.rope import apply_rope, softmax_scale


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q: [B, T, Hq, D], k: [B, S, Hkv, D], v: [B, S, Hkv, Dv]; mask: None (causal) or bool [B, 1, T, S]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first for SDPA
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)  # [B, T, Hq, Dv]


def _fusable(mods) -> tuple[type | None, tuple[str, ...]]:
    """(the layer type, the attributes to fuse) when q/k/v can share one buffer, else (None, ())."""
    from miles_core.quant.fp8 import BLOCK
    from miles_core.quant.layers import Fp8Linear

    kind = type(mods[0])
    if any(type(m) is not kind for m in mods):
        return None, ()
    if kind is nn.Linear:
        attrs = ("weight", "bias")
    elif kind is Fp8Linear and all(m.out_features % BLOCK == 0 for m in mods):
        attrs = ("weight", "weight_scale_inv", "bias")
    else:
        return None, ()
    if len({(m.weight.dtype, m.weight.device, m.weight.shape[1]) for m in mods}) > 1:
        return None, ()
    if len({m.bias is None for m in mods}) > 1:
        return None, ()
    return kind, attrs


class GQAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = d**-0.5

    def fuse_projections_(self) -> bool:
        """Back q/k/v_proj's weights (and biases) by one [Hq*D + 2*Hkv*D, H] buffer, each parameter a
        view of its rows, so `project` runs one GEMM instead of three (decode: three latency-bound
        launches become one). Parameters keep their identity, names and values; an update written
        into them (optimizer step, `copy_weights_`) lands in the buffer. Plain nn.Linear, or three
        `Fp8Linear` whose output sizes are multiples of the 128-row scale block (their e4m3 weights and
        block scales fused alike: one activation quantization and one FP8 GEMM); other quantized
        projections keep their own kernels. Returns whether the projections are fused."""
        mods = (self.q_proj, self.k_proj, self.v_proj)
        if self._fused() is not None:
            return True
        kind, attrs = _fusable(mods)
        if kind is None:
            return False
        with torch.no_grad():
            fused = []
            for attr in attrs:
                parts = [getattr(m, attr) for m in mods]
                if parts[0] is None:
                    fused.append(None)
                    continue
                buf = torch.cat([p.detach() for p in parts])
                start = 0
                for m, p in zip(mods, parts, strict=True):
                    view = buf[start : start + p.shape[0]]
                    if isinstance(p, nn.Parameter):
                        p.data = view
                    else:  # a buffer (Fp8Linear's weight and scales): the module's attribute becomes the view
                        setattr(m, attr, view)
                    start += p.shape[0]
                fused.append(buf)
        self.__dict__["_qkv_buffers"] = (kind, attrs, tuple(fused))  # not state: names and checkpoints unchanged
        return True

    def takes_fp8_rows(self, x: torch.Tensor) -> bool:
        """`project(x, xq)` would read x's rows quantized to FP8 (fused Fp8Linear projections at decode sizes,
        outside autograd): the norm that makes x can quantize them in its own launch."""
        bufs = None if torch.is_grad_enabled() else self._fused()
        if bufs is None or self.__dict__["_qkv_buffers"][0] is nn.Linear:
            return False
        from miles_core.kernels.fp8_gemm import dense_takes_fp8_rows

        return dense_takes_fp8_rows(x.numel() // x.shape[-1], bufs[0])

    def _fused(self):
        """The fused buffers (in `_fusable`'s attribute order) while they still back the three projections
        (else None: e.g. after a `load_state_dict(assign=True)` or a swap to other layers)."""
        state = self.__dict__.get("_qkv_buffers")
        if state is None:
            return None
        kind, attrs, bufs = state
        mods = (self.q_proj, self.k_proj, self.v_proj)
        for attr, buf in zip(attrs, bufs, strict=True):
            if buf is None:
                continue
            start = 0
            for m in mods:
                p = getattr(m, attr, None)
                if type(m) is not kind or p is None or p.data_ptr() != buf[start:].data_ptr():
                    return None
                start += p.shape[0]
        return bufs

    def project(self, x: torch.Tensor, xq=None):
        """x: [..., H] -> (q [..., Hq*D], k [..., Hkv*D], v [..., Hkv*D]), without rope or norms. One
        GEMM over the fused weight outside autograd when `fuse_projections_` made one (the buffer
        is not a parameter: no gradient flows through it), else the three projections. `xq`: x's rows
        already in FP8, read by a fused FP8 projection (`fp8_gemm.fp8_linear`), ignored otherwise."""
        bufs = None if torch.is_grad_enabled() else self._fused()
        if bufs is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.__dict__["_qkv_buffers"][0] is nn.Linear:
            y = F.linear(x, *bufs)  # weight, bias
        else:  # Fp8Linear: weight, weight_scale_inv, bias
            from miles_core.kernels.fp8_gemm import fp8_linear

            y = fp8_linear(x, *bufs, xq=xq)
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        return y.split([nq, nkv, nkv], dim=-1)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, T, H] -> q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D], rope applied."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask=None):
        q, k, v = self.qkv(x, cos, sin)
        out = attend(q, k, v, mask, self.scale)
        return self.o_proj(out.flatten(2))


class MLAttention(nn.Module):
    """Multi-head latent attention with low-rank q (optional) and kv projections, decoupled rope."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, self.n_heads = cfg.hidden_size, cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        qk_dim = self.nope + self.rope_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_rank + self.rope_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg)

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        return torch.cat([q_nope, apply_rope(q_rot, cos, sin, self.interleave)], dim=-1)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, T, H] -> (normed latent [B, T, kv_rank], rope key [B, T, 1, rope_dim]): what a cache stores."""
        b, t, _ = x.shape
        c, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        k_rot = apply_rope(k_rot.view(b, t, 1, self.rope_dim), cos, sin, self.interleave)
        return self.kv_a_layernorm(c), k_rot

    def expand(self, c: torch.Tensor, k_rot: torch.Tensor):
        """Latent [B, S, kv_rank] + rope key [B, S, 1, R] -> k [B, S, Hq, nope+R], v [B, S, Hq, Dv]."""
        b, s, _ = c.shape
        kv = self.kv_b_proj(c).view(b, s, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(b, s, self.n_heads, self.rope_dim)], dim=-1)
        return k, v

    def forward(self, x, cos, sin, mask=None):
        q = self.query(x, cos, sin)
        k, v = self.expand(*self.latent(x, cos, sin))
        out = attend(q, k, v, mask, self.scale)
        return self.o_proj(out.flatten(2))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLAttention(cfg) if cfg.attention == "mla" else GQAttention(cfg)
