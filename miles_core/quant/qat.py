"""Quantization-aware training: fake-quant with a straight-through gradient.

The training forward sees `dequant(quant(w))`, computed by the very functions that write the
rollout checkpoint (int4.py, fp8.py), so that the rollout engine's real INT4 (or FP8) weights equal
the trainer's fake-quantized ones bit for bit. The backward passes the gradient straight through
(identity): with amax scaling no weight is ever clipped, so the straight-through estimator is the
identity everywhere. It is an autograd Function rather than `w + (fq - w).detach()`, because that
sum is not bit-identical to `fq` in floating point.

`enable_qat(model)` plugs the fake-quant into every routed-experts module (its `weight_transform`
hook, applied to the stacked [E, out, in] weights before the grouped GEMM) and, when asked, into
dense `nn.Linear` layers (a subclass swap that keeps parameter names, so checkpoints are unchanged).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.errors import MilesError
from miles_core.quant.fp8 import fp8_block_dequantize, fp8_block_quantize
from miles_core.quant.int4 import int4_group_dequantize, int4_group_quantize

__all__ = ["fake_quant_int4", "fake_quant_fp8", "fake_quant", "enable_qat", "disable_qat", "QATLinear"]


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return fn(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # straight-through


def _int4_values(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> torch.Tensor:
    q, s = int4_group_quantize(w, group_size, scale_dtype, what="QAT weight")
    return int4_group_dequantize(q, s, group_size, dtype=w.dtype)


def _fp8_values(w: torch.Tensor, pow2: bool) -> torch.Tensor:
    q, s = fp8_block_quantize(w, pow2=pow2, what="QAT weight")
    return fp8_block_dequantize(q, s, dtype=w.dtype)


def fake_quant_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16):
    """w: [..., out, in] -> same shape and dtype, INT4-group-quantized values; gradient passes straight."""
    return _FakeQuant.apply(w, functools.partial(_int4_values, group_size=group_size, scale_dtype=scale_dtype))


def fake_quant_fp8(w: torch.Tensor, pow2: bool = False):
    """w: [..., out, in] -> same shape and dtype, FP8 128x128-block-quantized values; straight-through.

    For stacked experts, blocks are per expert and per 128 rows: they match the per-expert
    gate_proj/up_proj blocks on disk when moe_intermediate_size is a multiple of 128.
    """
    return _FakeQuant.apply(w, functools.partial(_fp8_values, pow2=pow2))


def fake_quant(fmt: str, group_size: int = 128, **kw) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weight transform for a format: 'int4' or 'fp8'."""
    if fmt == "int4":
        return functools.partial(fake_quant_int4, group_size=group_size, **kw)
    if fmt == "fp8":
        return functools.partial(fake_quant_fp8, **kw)
    raise MilesError(f"unknown QAT format {fmt!r}; use 'int4' or 'fp8'")


class QATLinear(nn.Linear):
    """nn.Linear whose forward uses fake-quantized weights; same parameters, same state_dict."""

    weight_transform: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_transform(self.weight), self.bias)


def _is_experts(module: nn.Module) -> bool:
    return hasattr(module, "weight_transform") and hasattr(module, "gate_up_proj")


def enable_qat(
    model: nn.Module,
    fmt: str = "int4",
    group_size: int = 128,
    experts: bool = True,
    linear_pattern: str | None = None,
    **kw,
) -> list[str]:
    """Turn fake-quant on; returns the names of the modules it applies to.

    experts: routed-experts modules (default, the INT4 QAT recipe).
    linear_pattern: a regex; nn.Linear modules whose full name matches it are fake-quantized too
    (e.g. r"self_attn\\.(q|k|v|o)_proj$"); routers and lm_head stay out unless the regex names them.
    """
    transform = fake_quant(fmt, group_size, **kw)
    done = []
    for name, module in model.named_modules():
        if experts and _is_experts(module):
            module.weight_transform = transform
            done.append(name)
        elif linear_pattern and type(module) in (nn.Linear, QATLinear) and re.search(linear_pattern, name):
            module.__class__ = QATLinear
            module.weight_transform = transform
            done.append(name)
    if not done:
        raise MilesError("enable_qat found no routed-experts module or matching Linear layer to fake-quantize")
    return done


def disable_qat(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, QATLinear):
            module.__class__ = nn.Linear
            del module.weight_transform
        elif _is_experts(module):
            module.weight_transform = None
