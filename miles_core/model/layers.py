"""Small building blocks: RMSNorm and the SwiGLU MLP (dense layers and shared experts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):
    from miles_core.errors import MilesError

    if name not in _ACTIVATIONS:
        raise MilesError(f"unsupported hidden_act {name!r}; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def gated(act, x: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for x = [..., 2I] holding gate then up (a fused gate/up projection's output).

    silu on CUDA is one Triton kernel each way (`miles_core.kernels.swiglu`), except under
    torch.compile, which fuses the pure-torch form itself.
    """
    if act is F.silu and x.is_cuda and x.dim() == 2 and not torch.compiler.is_compiling():
        from miles_core.kernels.swiglu import swiglu

        return swiglu(x)
    gate, up = x.chunk(2, dim=-1)
    return act(gate) * up


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in float32, the product in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not torch.compiler.is_compiling():
            # One fused kernel instead of five; statistics in float32, at most one bf16 ulp from the
            # reference below (which rounds to the input dtype before the weight multiply).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)); HF names gate_proj / up_proj / down_proj."""

    def __init__(self, hidden: int, inter: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
