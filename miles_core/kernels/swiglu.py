"""SwiGLU on a fused gate/up projection (Triton): silu(gate) * up from one [M, 2I] tensor.

    out[m, i] = silu(x[m, i]) * x[m, I + i],        silu(g) = g * sigmoid(g)
    dx[m, i]     = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    dx[m, I + i] = dout * silu(g)

The experts' gate_up GEMM writes gate and up side by side. In pure torch, `chunk` gives two strided
halves, so the activation runs on the slow non-vectorised elementwise path, and the backward
concatenates the two halves' gradients with a `cat`. Here one kernel reads the two halves and
writes the output, and one kernel writes the whole [M, 2I] gradient. Both compute in float32 and
round once. The pure-torch form is `torch_swiglu` (CPU path, reference).

`silu_mul` is the forward formula as a Triton function, shared with the kernels that fuse SwiGLU into
a neighbour (the bf16 grouped GEMM's epilogue, `grouped_triton`; the FP8 act-quant of the down GEMM's
input, `quant_triton.swiglu_fp8_quant_kernel`): given the same rounded inputs they give these bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton
    triton = None

_BLOCK = 1024


def torch_swiglu(x: Tensor) -> Tensor:
    """[M, 2I] -> [M, I]: silu(gate) * up, gate the first half of the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def silu_mul(g, u):
        # fp32 gate and up -> silu(g) * u in fp32 (the caller rounds once)
        return g * tl.sigmoid(g) * u

    @triton.jit
    def _swiglu_fwd_kernel(x_ptr, out_ptr, total, inter, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < total
        row, col = idx // inter, idx % inter
        g = tl.load(x_ptr + row * 2 * inter + col, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * 2 * inter + inter + col, mask=inside, other=0.0).to(tl.float32)
        out = silu_mul(g, u)
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_bwd_kernel(x_ptr, dout_ptr, dx_ptr, total, inter, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < total
        row, col = idx // inter, idx % inter
        g = tl.load(x_ptr + row * 2 * inter + col, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * 2 * inter + inter + col, mask=inside, other=0.0).to(tl.float32)
        d = tl.load(dout_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = d * u * s * (1.0 + g * (1.0 - s))
        du = d * g * s
        tl.store(dx_ptr + row * 2 * inter + col, dg.to(dx_ptr.dtype.element_ty), mask=inside)
        tl.store(dx_ptr + row * 2 * inter + inter + col, du.to(dx_ptr.dtype.element_ty), mask=inside)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        m, two_i = x.shape
        out = x.new_empty(m, two_i // 2)
        if out.numel():
            _swiglu_fwd_kernel[(triton.cdiv(out.numel(), _BLOCK),)](x, out, out.numel(), two_i // 2, BLOCK=_BLOCK)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        if grad.numel():
            _swiglu_bwd_kernel[(triton.cdiv(grad.numel(), _BLOCK),)](x, grad, dx, grad.numel(), x.shape[1] // 2,
                                                                     BLOCK=_BLOCK)  # fmt: skip
        return dx


@torch.compiler.disable
def _fused(x: Tensor) -> Tensor:
    return _SwiGLU.apply(x.contiguous())


def swiglu(x: Tensor) -> Tensor:
    """[M, 2I] (gate columns, then up columns) -> [M, I] = silu(gate) * up; fused on CUDA."""
    if triton is not None and x.is_cuda and x.dim() == 2:
        return _fused(x)
    return torch_swiglu(x)
