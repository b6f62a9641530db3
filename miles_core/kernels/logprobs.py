"""Fused token log-probs and entropy over a large vocabulary (Triton): one read of the logits.

For logits z = x / T of one row (x in its own dtype, upcast to float32 in registers):

    logp   = z[token] - lse,              lse = log sum_j exp(z_j)
    H      = lse - E_p[z],                E_p[z] = sum_j p_j z_j,  p = softmax(z)

The forward streams each row once (an online max / sum-exp / sum-exp-times-z per lane, combined at
the end) and writes only [N] float32 results. The backward rebuilds p from the saved lse and writes
the logits' gradient in the logits' dtype, one pass:

    d/dz_k = g_logp * (1[k = token] - p_k) - g_H * p_k * (z_k - E_p[z]),   d/dx = d/dz / T

What this replaces on the GPU (`miles_core.rl.logprobs_and_entropy` + autograd): a float32 upcast of
the [N, V] logits, log_softmax, exp, the entropy product and their backward, each a vocabulary-sized
pass in float32; for 8k tokens of a 152k vocabulary that is ~5 GB per pass. Rows are independent and
each is reduced in a fixed order, so a token's log-prob does not depend on the batch it is in.

The pure-torch functions in `miles_core.rl.logits` are the reference (and the CPU path); values
agree to float32 rounding (the reduction order differs), not bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton: the reference path is used
    triton = None

_BLOCK_FWD = 4096
_BLOCK_BWD = 4096


def available(logits: Tensor) -> bool:
    """True when the fused kernels can run on these logits (CUDA tensor, float dtype, triton present)."""
    return triton is not None and logits.is_cuda and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)


if triton is not None:

    @triton.jit
    def _logprob_fwd_kernel(x_ptr, stride, tok_ptr, logp_ptr, ent_ptr, lse_ptr, mean_ptr, V, temperature,
                    BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        base = x_ptr + row.to(tl.int64) * stride
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max
        s = tl.zeros([BLOCK], tl.float32)  # per-lane sum exp(z - m)
        t = tl.zeros([BLOCK], tl.float32)  # per-lane sum exp(z - m) * z
        for start in range(0, V, BLOCK):
            offs = start + lanes
            z = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) / temperature
            new_m = tl.maximum(m, z)
            live = new_m > float("-inf")
            shift = tl.where(live, new_m, 0.0)
            scale = tl.exp(m - shift)
            e = tl.exp(z - shift)
            s = s * scale + e
            t = t * scale + tl.where(e > 0, e * z, 0.0)
            m = new_m
        top = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        total = tl.sum(s * w, 0)
        lse = top + tl.log(total)
        mean = tl.sum(t * w, 0) / total
        tok = tl.load(tok_ptr + row)
        zt = tl.load(base + tok).to(tl.float32) / temperature
        tl.store(logp_ptr + row, zt - lse)
        tl.store(ent_ptr + row, lse - mean)
        tl.store(lse_ptr + row, lse)
        tl.store(mean_ptr + row, mean)

    @triton.jit
    def _logprob_bwd_kernel(x_ptr, stride, dx_ptr, dstride, tok_ptr, lse_ptr, mean_ptr, glogp_ptr, gent_ptr, V,
                    temperature, HAS_GENT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < V
        z = tl.load(x_ptr + row.to(tl.int64) * stride + offs, mask=inside, other=0.0).to(tl.float32) / temperature
        lse = tl.load(lse_ptr + row)
        gl = tl.load(glogp_ptr + row)
        p = tl.exp(z - lse)
        tok = tl.load(tok_ptr + row)
        d = tl.where(offs == tok, gl, 0.0) - gl * p
        if HAS_GENT:
            ge = tl.load(gent_ptr + row)
            mean = tl.load(mean_ptr + row)
            d -= ge * tl.where(p > 0, p * (z - mean), 0.0)
        d = d / temperature
        tl.store(dx_ptr + row.to(tl.int64) * dstride + offs, d.to(dx_ptr.dtype.element_ty), mask=inside)


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float):
        n, v = logits.shape
        logp, ent, lse, mean = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(4))
        if n:
            _logprob_fwd_kernel[(n,)](logits, logits.stride(0), tokens, logp, ent, lse, mean, v, float(temperature),
                              BLOCK=_BLOCK_FWD, num_warps=8)  # fmt: skip
        ctx.save_for_backward(logits, tokens, lse, mean)
        ctx.temperature = temperature
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        logits, tokens, lse, mean = ctx.saved_tensors
        n, v = logits.shape
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        has_ent = g_ent is not None
        g_ent = g_logp if g_ent is None else g_ent.float().contiguous()
        dx = torch.empty_like(logits)
        if n:
            grid = (n, triton.cdiv(v, _BLOCK_BWD))
            _logprob_bwd_kernel[grid](logits, logits.stride(0), dx, dx.stride(0), tokens, lse, mean, g_logp, g_ent, v,
                              float(ctx.temperature), HAS_GENT=has_ent, BLOCK=_BLOCK_BWD, num_warps=8)  # fmt: skip
        return dx, None, None


def fused_logprobs_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(log softmax(logits / T)[token], entropy of softmax(logits / T)), differentiable in both.

    logits: [..., V] CUDA float (row-contiguous is not required, the last dim must be), tokens: [...]
    int64 valid ids. Returns two float32 tensors of shape [...]. See the module doc.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    logp, ent = _FusedLogprobs.apply(flat, tokens.reshape(-1).contiguous(), temperature)
    return logp.view(tokens.shape), ent.view(tokens.shape)
