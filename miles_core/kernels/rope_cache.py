"""q/k RMSNorm + rope + KV-cache write of a GQA layer in one Triton launch (decode and prefill).

At decode (one new token per row) everything a GQA layer does between its q/k/v projections and
`flash_decode` is a row of tiny elementwise kernels: q_norm and k_norm (`F.rms_norm`), `apply_rope`
on q and on k (x * cos, rotate_half's chunk / neg / cat, * sin, +), then two `index_put` writes of
K and V into the slot cache: about 14 launches per layer per step that move a few KB each, so at
batch 64 the step pays launch latency, not bandwidth. `rope_norm_cache` does all of it in one
launch: one program per (row, a few heads: `heads_per_program`), the q heads first, then the KV heads
(which also copy v).
A prefill passes every token as a row (`k_out` also returns the roped k for the step's own
attention): there the same ops are passes over [B, T, H, D] tensors, several of them strided or
unvectorized (rotate_half's cat, the index writes), ~2.9 ms per layer for 64 x 512 tokens of
Qwen3-30B-A3B on an H200 (bench/RESULTS.md).

Numerics follow the eager bf16 sequence rounding step by rounding step, so that the result is the
eager path's bit for bit, except where the RMSNorm's float32 sum of squares is added in another
order (then a normed value can be one ulp apart):

    y  = round(x * rsqrt(mean(x^2) + eps) * w)          F.rms_norm: fp32 statistics, one rounding
    t1 = round(y * cos), t2 = round(rotate_half(y) * sin), out = round(t1 + t2)     apply_rope

rotate_half(y) = cat(-y[D/2:], y[:D/2]) needs no shuffle: the program loads its head a second time
with the columns permuted (d + D/2 mod D) and normalises that copy with the same rstd. The kernel is
compiled without FMA contraction (`launch_options`): a fused x * cos + t2 would skip the rounding
of t1. Products of two 16-bit numbers are exact in fp32, and fp32 sums rounded to bf16/fp16 round
as a single rounding would, so the 16-bit multiplies and adds the compiler emits give eager's bits.

`rope_norm_cache_reference` is the same in plain torch (the model core's own ops and the cache's
index write), the CPU path and what the tests hold the kernel to. `kernels.DECODE_FUSION = False`
(with the other decode-size kernels) or `MILES_NO_ROPE_CACHE_KERNEL=1` (this one alone) switches
it off: the engine then runs the eager ops, for comparisons and benchmarks.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from miles_core.model.rope import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton: the eager ops are used
    triton = None

__all__ = [
    "enabled",
    "heads_per_program",
    "launch_options",
    "rope_cache_ok",
    "rope_norm_cache",
    "rope_norm_cache_reference",
]


def enabled() -> bool:
    """False when switched off: with the other decode-size fused kernels (`kernels.DECODE_FUSION`,
    bench/rollout.py --unfused), or alone (MILES_NO_ROPE_CACHE_KERNEL=1)."""
    from miles_core import kernels

    return kernels.DECODE_FUSION and os.environ.get("MILES_NO_ROPE_CACHE_KERNEL", "0") in ("", "0")


def rope_cache_ok(x: Tensor, cos: Tensor, cache_k: Tensor, norm_weights: tuple = (), any_t: bool = False) -> bool:
    """The kernel applies to this step: CUDA and triton, not switched off, no autograd (it has no
    backward), one new token per row (x [B, 1, H]; any number with `any_t`, a prefill's rows), one
    16-bit dtype for x, cos, the cache and the norm weights, rope over the whole head (cos [B, T, D]),
    the cache's head dim contiguous."""
    d = cache_k.shape[-1]
    return (
        x.is_cuda
        and triton is not None
        and enabled()
        and not torch.is_grad_enabled()
        and x.dim() == 3
        and (x.shape[1] == 1 or any_t)
        and x.dtype in (torch.bfloat16, torch.float16)
        and cache_k.dtype == x.dtype
        and cos.dtype == x.dtype
        and cos.shape[-1] == d
        and d % 2 == 0
        and cache_k.stride(-1) == 1
        and all(w.dtype == x.dtype and w.numel() == d for w in norm_weights)
    )


if triton is not None:

    @triton.jit
    def _norm_rope(src, w_ptr, cos, sin, eps, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr):
        """One head [D] at src -> normed (optional) and roped [BLOCK_D], rounded to src's dtype."""
        dt = src.dtype.element_ty
        offs = tl.arange(0, BLOCK_D)
        inside = offs < D
        partner = tl.where(offs < D // 2, offs + D // 2, offs - D // 2)  # rotate_half's source column
        x = tl.load(src + offs, mask=inside, other=0.0).to(tl.float32)  # [BLOCK_D]
        xp = tl.load(src + partner, mask=inside, other=0.0).to(tl.float32)  # x permuted: cat(x2, x1)
        if HAS_NORM:
            ms = tl.math.div_rn(tl.sum(x * x, 0), tl.full([], D, tl.float32))  # mean of squares, IEEE division
            rstd = tl.math.rsqrt(ms + eps)
            w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            wp = tl.load(w_ptr + partner, mask=inside, other=0.0).to(tl.float32)
            x = (x * rstd * w).to(dt).to(tl.float32)
            xp = (xp * rstd * wp).to(dt).to(tl.float32)
        rot = tl.where(offs < D // 2, -1.0, 1.0) * xp  # rotate_half(y) = cat(-y2, y1); a product keeps -0
        t1 = (x * cos).to(dt).to(tl.float32)
        t2 = (rot * sin).to(dt).to(tl.float32)
        return (t1 + t2).to(dt)

    @triton.jit
    def _rope_cache_kernel(
        q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, ck_ptr, cv_ptr, slot_ptr, pos_ptr, out_ptr, kout_ptr,
        eps, stride_q, stride_k, stride_v, stride_cs, stride_sn,
        stride_slot, stride_pos, stride_head,
        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_NORM: tl.constexpr,
        K_OUT: tl.constexpr, HPP: tl.constexpr,
    ):  # fmt: skip
        # program (row b, heads [HPP * g, HPP * g + HPP)): the q heads first, then the KV heads; each head
        # through the same one-head code (so the same bits whatever HPP), unrolled so their loads overlap
        b = tl.program_id(0).to(tl.int64)  # row
        offs = tl.arange(0, BLOCK_D)
        inside = offs < D
        cos = tl.load(cos_ptr + b * stride_cs + offs, mask=inside, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_sn + offs, mask=inside, other=0.0).to(tl.float32)
        for i in tl.static_range(HPP):
            h = tl.program_id(1) * HPP + i  # q head h, or KV head h - HQ
            if h < HQ:
                y = _norm_rope(q_ptr + b * stride_q + h * D, qw_ptr, cos, sin, eps, D, BLOCK_D, HAS_NORM)
                tl.store(out_ptr + (b * HQ + h) * D + offs, y, mask=inside)
            elif h < HQ + HKV:
                j = h - HQ
                y = _norm_rope(k_ptr + b * stride_k + j * D, kw_ptr, cos, sin, eps, D, BLOCK_D, HAS_NORM)
                dst = tl.load(slot_ptr + b) * stride_slot + tl.load(pos_ptr + b) * stride_pos + j * stride_head + offs
                tl.store(ck_ptr + dst, y.to(ck_ptr.dtype.element_ty), mask=inside)
                if K_OUT:  # the normed + roped k also as a [rows, Hkv, D] tensor (a prefill attends to it)
                    tl.store(kout_ptr + (b * HKV + j) * D + offs, y, mask=inside)
                v = tl.load(v_ptr + b * stride_v + j * D + offs, mask=inside, other=0.0)
                tl.store(cv_ptr + dst, v.to(cv_ptr.dtype.element_ty), mask=inside)


def heads_per_program(rows: int, heads: int) -> int:
    """Heads one program takes, by rows (the bits do not depend on it). One warp per (row, head) made ~1.2M
    tiny programs for a 64 x 512-token prefill of Qwen3-30B-A3B (32 + 4 heads of 128). On an H200
    (`bench/decode_kernels.py --only rope`, CUDA graphs; 1 / 2 / 4 / 6 / 9 / 12 heads per program):
    64 rows 3.2 / **2.9** / 3.9 / 4.4 / 5.6 / 6.6 us; 256 rows 7.6 / 5.1 / **4.3** / 4.9 / 5.8 / 6.9 us;
    32,768 rows 715.4 / 383.7 / 293.1 / 265.7 / 257.6 / **255.2** us (1.54x the bytes at the copy rate)."""
    if rows <= 128:
        return min(2, heads)
    return min(4 if rows <= 4096 else 12, heads)


def _rows(x: Tensor, b: int) -> Tensor:
    """x: [B, ...] -> [B, n] with unit stride along n (a view for projection outputs)."""
    x = x.reshape(b, -1)
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_norm_cache(
    q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, eps: float,
    cos: Tensor, sin: Tensor, cache_k: Tensor, cache_v: Tensor, slot: Tensor, pos: Tensor,
    k_out: Tensor | None = None, hpp: int | None = None,
) -> Tensor:  # fmt: skip
    """q [B, Hq*D] (or [B, (1,) Hq, D]), k, v [B, Hkv*D] (or [B, (1,) Hkv, D]), 16-bit; q_weight,
    k_weight: RMSNorm weights [D] or None (no qk-norm); cos, sin [B, (1,) D]; cache_k, cache_v
    [slots + 1, max_len, Hkv, D]; slot, pos [B] long. B counts rows: a prefill passes its B * T
    tokens as rows (q [B, T, Hq*D] and cos [B, T, D] reshape to them, slot and pos flattened).

    Writes the normed + roped k and the raw v at cache[slot[b], pos[b]] -> q normed + roped
    [B, 1, Hq, D]; `k_out` ([B * Hkv * D] elements, contiguous, q's dtype) also receives the normed +
    roped k. One launch, a static grid for a given B (CUDA-graph capturable), no host sync. `hpp`: heads
    per program (default `heads_per_program`; the bits do not depend on it).
    """
    assert cache_v.stride() == cache_k.stride() and (q_weight is None) == (k_weight is None)
    b, hkv, d = slot.shape[0], cache_k.shape[2], cache_k.shape[3]
    q2, k2, v2 = _rows(q, b), _rows(k, b), _rows(v, b)  # [B, Hq*D], [B, Hkv*D], [B, Hkv*D]
    cos2, sin2 = _rows(cos, b), _rows(sin, b)  # [B, D]
    hq = q2.shape[1] // d
    out = torch.empty(b, 1, hq, d, dtype=q.dtype, device=q.device)  # [B, 1, Hq, D]
    has_norm = q_weight is not None
    if k_out is not None:
        assert k_out.is_contiguous() and k_out.numel() == b * hkv * d and k_out.dtype == q.dtype
    hpp = hpp or heads_per_program(b, hq + hkv)
    _rope_cache_kernel[(b, triton.cdiv(hq + hkv, hpp))](
        q2, k2, v2, q_weight if has_norm else q2, k_weight if has_norm else k2, cos2, sin2,
        cache_k, cache_v, slot.reshape(-1).contiguous(), pos.reshape(-1).contiguous(), out,
        k_out if k_out is not None else out,
        float(eps), q2.stride(0), k2.stride(0), v2.stride(0), cos2.stride(0), sin2.stride(0),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        HQ=hq, HKV=hkv, D=d, BLOCK_D=triton.next_power_of_2(d), HAS_NORM=has_norm, K_OUT=k_out is not None,
        HPP=hpp, **launch_options(d),
    )  # fmt: skip
    return out


def launch_options(d: int) -> dict:
    """Warps for a head of d, and no FMA contraction: each product rounds where eager rounds it
    (a fused x * cos + t2 would skip the rounding of x * cos)."""
    return {"num_warps": 1 if d <= 128 else 2, "enable_fp_fusion": False}


def rope_norm_cache_reference(
    q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor | None, k_weight: Tensor | None, eps: float,
    cos: Tensor, sin: Tensor, cache_k: Tensor, cache_v: Tensor, slot: Tensor, pos: Tensor,
) -> Tensor:  # fmt: skip
    """The same with the model core's ops: the RMSNorm as `RMSNorm.forward` runs it on CUDA
    (`F.rms_norm`), `apply_rope`, and `KVCache.write`'s index write. Same arguments and result."""
    b, d = slot.shape[0], cache_k.shape[-1]
    q, k, v = q.reshape(b, 1, -1, d), k.reshape(b, 1, -1, d), v.reshape(b, 1, -1, d)  # [B, 1, H, D]
    if q_weight is not None:
        q, k = F.rms_norm(q, (d,), q_weight, eps), F.rms_norm(k, (d,), k_weight, eps)
    cos, sin = cos.reshape(b, 1, d), sin.reshape(b, 1, d)  # [B, T=1, D]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cache_k[slot, pos] = k[:, 0].to(cache_k.dtype)  # [B, Hkv, D] into [slots+1, max_len, Hkv, D]
    cache_v[slot, pos] = v[:, 0].to(cache_v.dtype)
    return q
