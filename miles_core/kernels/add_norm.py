"""Residual add + RMSNorm, and the MoE combine before them, in one Triton launch per layer boundary.

Between two attentions a decoder layer of the rollout engine runs, each op its own launch:

    x = x + a;  h = post_attention_layernorm(x)              attention out -> the MoE's input
    c = combine(ys, inverse, weights);  x = x + c;  h = next input_layernorm(x)     MoE out -> next

Five elementwise/row kernels that each move a few hundred KB at decode (64 rows of 2048), so a
step of a 48-layer model pays ~240 launches (2.5-3.5 us each in a CUDA graph) for microseconds of
traffic. Here the first line is `add_rms_norm` and the second `combine_add_rms_norm`: two launches
per layer, one program per row, the whole row in registers (H up to 16384), a static grid and no
host sync (CUDA-graph capturable).

Numerics, against the ops they replace:
- s = x + r (or x + c) is torch's sum bit for bit: each 16-bit addend widened to float32, one
  float32 add, one rounding to the dtype, as torch's elementwise add does.
- c is `moe_combine.combine`'s result bit for bit: the same float32 `acc += w * y` over the k slots
  in order j = 0..k-1 (compiled with the same options, so contracted into the same FMAs), rounded
  once to ys's dtype.
- h is F.rms_norm(s) (what `RMSNorm.forward` runs on CUDA: float32 statistics, x * rstd * w rounded
  once) within one ulp of a 16-bit dtype: the float32 sum of squares is added in another order
  here, so rstd may differ in its last bits (in float32 that shows as a few ulps).

`add_rms_norm_reference` / `combine_add_rms_norm_reference` are the same in plain torch, the CPU
path and what the tests hold the kernels to. The public functions use the kernels on CUDA when no
gradient is needed and the references otherwise; the engine takes the fused layer loop only when
`fused_ok` (`kernels.DECODE_FUSION`, MILES_DECODE_FUSION=0 turns it off with the other fusions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from miles_core.quant.fp8 import ACT_EPS, FP8_DTYPE, fp8_act_quantize_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton: the references are used
    triton = None

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "combine_add_rms_norm",
    "combine_add_rms_norm_reference",
    "combine_reference",
    "fused_ok",
]

MAX_H = 16384  # the whole row lives in one program's registers
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fused_ok(x: Tensor) -> bool:
    """The engine's fused layer loop applies: CUDA and triton, switched on (`kernels.DECODE_FUSION`),
    no autograd (the kernels have no backward), a float dtype and a row that fits one program."""
    from miles_core import kernels

    return kernels.DECODE_FUSION and _kernel_ok(x) and not torch.is_grad_enabled()


def _kernel_ok(x: Tensor, *others: Tensor | None) -> bool:
    """The kernels can run on these tensors: CUDA, triton, a supported dtype, no gradient needed."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others))
    return (
        triton is not None
        and _on_gpu(x)
        and x.dtype in _DTYPES
        and x.shape[-1] <= MAX_H
        and not needs_grad
        and not torch.compiler.is_compiling()
    )


def _on_gpu(x: Tensor) -> bool:
    return x.is_cuda  # the interpreter tests let CPU tensors through here


# ---- pure-torch references ---------------------------------------------------------------------


def add_rms_norm_reference(x: Tensor, r: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, r [..., H] -> (s = x + r, F.rms_norm(s) with `weight` [H]), as the unfused layer runs them."""
    s = x + r
    return s, F.rms_norm(s, (s.shape[-1],), weight, eps)


def combine_reference(ys: Tensor, inverse: Tensor, weights: Tensor) -> Tensor:
    """`moe_combine.combine`'s arithmetic: ys [N*k, H], inverse [N*k], weights [N, k] -> [N, H] =
    float32 sum over j = 0..k-1 of weights[n, j] * ys[inverse[n*k + j]], rounded once to ys.dtype."""
    n, k = weights.shape
    y = ys.index_select(0, inverse).view(n, k, -1).float()  # [N, k, H]
    w = weights.float()
    acc = torch.zeros(n, ys.shape[-1], dtype=torch.float32, device=ys.device)  # [N, H]
    for j in range(k):
        acc = acc + w[:, j, None] * y[:, j]
    return acc.to(ys.dtype)


def combine_add_rms_norm_reference(
    ys: Tensor, inverse: Tensor, weights: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None]:
    """x [..., H] (N rows) -> (s = x + combine(ys, inverse, weights), F.rms_norm(s) or None without `weight`)."""
    s = x + combine_reference(ys, inverse, weights).view(x.shape)
    return s, None if weight is None else F.rms_norm(s, (s.shape[-1],), weight, eps)


# ---- kernels ------------------------------------------------------------------------------------

if triton is not None:
    from miles_core.kernels.quant_triton import _quantize_rows

    @triton.jit
    def _norm_store(s, w_ptr, h_row, offs, inside, eps, H: tl.constexpr):
        """One row s [BLOCK_H] (float32, zero past H) -> h = s * rsqrt(mean(s^2) + eps) * w, stored at
        h_row in its dtype: F.rms_norm's float32 statistics and single rounding."""
        ms = tl.math.div_rn(tl.sum(s * s, 0), tl.full([], H, tl.float32))  # mean of squares, IEEE division
        rstd = tl.math.rsqrt(ms + eps)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(h_row + offs, (s * rstd * w).to(h_row.dtype.element_ty), mask=inside)

    @triton.jit
    def _add_norm_kernel(
        x_ptr, r_ptr, w_ptr, s_ptr, h_ptr, q_ptr, qs_ptr, eps, qeps, stride_x, stride_r,
        H: tl.constexpr, BLOCK_H: tl.constexpr, QUANT: tl.constexpr, G: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)  # row
        offs = tl.arange(0, BLOCK_H)
        inside = offs < H
        x = tl.load(x_ptr + n * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + n * stride_r + offs, mask=inside, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)  # torch's x + r: one float32 add, one rounding
        tl.store(s_ptr + n * H + offs, s, mask=inside)
        _norm_store(s.to(tl.float32), w_ptr, h_ptr + n * H, offs, inside, eps, H)
        if QUANT:  # h's 1x128 tiles as fp8_act_quant_kernel quantizes them (the same function, the same bits)
            # read back from memory (after a barrier: the program's own stores), not reshaped in registers:
            # a [G, 128] view of the row would change the layout the compiler picks for the norm above, and
            # with it the sum of squares' order, so h's bits would differ from the QUANT=False kernel's
            tl.debug_barrier()
            cols = tl.arange(0, G)[:, None] * 128 + tl.arange(0, 128)[None, :]  # [G, 128]
            h = tl.load(h_ptr + n * H + cols, mask=cols < H, other=0.0).to(tl.float32)
            q, scale = _quantize_rows(h, qeps)  # zeros past H: no effect on a tile's amax
            tl.store(q_ptr + n * H + cols, q.to(q_ptr.dtype.element_ty), mask=cols < H)
            g = tl.arange(0, G)  # G: the row's 128-column tiles, rounded up to a power of two
            tl.store(qs_ptr + n * ((H + 127) // 128) + g, scale, mask=g * 128 < H)

    @triton.jit
    def _combine_add_norm_kernel(
        ys_ptr, inv_ptr, cw_ptr, x_ptr, w_ptr, s_ptr, h_ptr, eps, stride_x,
        H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64)  # token
        offs = tl.arange(0, BLOCK_H)
        inside = offs < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        for j in tl.static_range(K):  # moe_combine's loop, op for op: its float32 sum bit for bit
            src = tl.load(inv_ptr + n * K + j).to(tl.int64)
            w = tl.load(cw_ptr + n * K + j).to(tl.float32)
            acc += w * tl.load(ys_ptr + src * H + offs, mask=inside, other=0.0).to(tl.float32)
        c = acc.to(ys_ptr.dtype.element_ty).to(tl.float32)  # combine's output, rounded to ys's dtype
        x = tl.load(x_ptr + n * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        s = (x + c).to(s_ptr.dtype.element_ty)  # torch's x + c
        tl.store(s_ptr + n * H + offs, s, mask=inside)
        if HAS_NORM:
            _norm_store(s.to(tl.float32), w_ptr, h_ptr + n * H, offs, inside, eps, H)


def _rows(t: Tensor) -> Tensor:
    """[..., H] -> [N, H] with unit stride along H (a view when it can be)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(h: int) -> dict:
    """The row's block and warps: 16 elements per thread up to 4096 (1 to 8 warps), 32 beyond (8 or 16
    warps; sm_90 AOT: 16 warps at H = 7168 spill in the combine kernel, 8 do not)."""
    block = triton.next_power_of_2(h)
    return {"BLOCK_H": block, "num_warps": max(1, block // 512) if block <= 4096 else block // 1024}


def add_rms_norm(x: Tensor, r: Tensor, weight: Tensor, eps: float, quant: bool = False):
    """x, r [..., H] (one dtype), weight [H] -> (s = x + r, h = RMSNorm(s) * weight), both like x.
    `quant`: also h's rows quantized to FP8 as `fp8_gemm.fp8_act_quant` does (1x128 tiles, the same
    bits), for FP8 experts that read them in place: (s, h, (q [N, H] e4m3, scale [N, ceil(H/128)] fp32)).

    One launch on CUDA (one program per row); the reference elsewhere and when a gradient is needed.
    """
    if not (_kernel_ok(x, r, weight) and r.dtype == x.dtype and r.shape == x.shape):
        s, h = add_rms_norm_reference(x, r, weight, eps)
        return (s, h, fp8_act_quantize_reference(h.reshape(-1, h.shape[-1]))) if quant else (s, h)
    hdim = x.shape[-1]
    x2, r2 = _rows(x), _rows(r)  # [N, H]
    s, h = x2.new_empty(x2.shape), x2.new_empty(x2.shape)  # [N, H] contiguous
    if quant:
        q = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x.device)
        qs = torch.empty(x2.shape[0], -(-hdim // 128), dtype=torch.float32, device=x.device)
    else:
        q, qs = h, h  # unread
    if x2.shape[0]:
        _add_norm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), s, h, q, qs, float(eps), ACT_EPS, x2.stride(0), r2.stride(0),
            H=hdim, QUANT=quant, G=triton.next_power_of_2(-(-hdim // 128)), **_launch(hdim),
        )  # fmt: skip
    return (s.view(x.shape), h.view(x.shape), (q, qs)) if quant else (s.view(x.shape), h.view(x.shape))


def combine_add_rms_norm(
    ys: Tensor, inverse: Tensor, weights: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor | None]:
    """ys [N*k, H] (the experts' outputs in sorted order), inverse [N*k] (slot n*k + j -> its row of
    ys), weights [N, k], x [..., H] (N rows) -> (s = x + combine(ys, inverse, weights), h =
    RMSNorm(s) * weight, or None when `weight` is None), both like x.

    One launch on CUDA (one program per token); the reference elsewhere and when a gradient is needed.
    """
    ok = _kernel_ok(x, ys, weights, weight) and ys.dtype == x.dtype and ys.shape[-1] == x.shape[-1]
    if not ok:
        return combine_add_rms_norm_reference(ys, inverse, weights, x, weight, eps)
    n, k = weights.shape
    hdim = x.shape[-1]
    x2 = _rows(x)  # [N, H]
    assert x2.shape[0] == n and ys.shape[0] == n * k, (x.shape, ys.shape, weights.shape)
    s = x2.new_empty(x2.shape)  # [N, H] contiguous
    h = x2.new_empty(x2.shape) if weight is not None else None
    w, h_out = (weight.contiguous(), h) if weight is not None else (x2, s)  # unread without a norm
    if n:
        _combine_add_norm_kernel[(n,)](
            ys.contiguous(), inverse.contiguous(), weights.contiguous(), x2, w, s, h_out, float(eps), x2.stride(0),
            H=hdim, K=k, HAS_NORM=weight is not None, **_launch(hdim),
        )  # fmt: skip
    return s.view(x.shape), None if h is None else h.view(x.shape)
