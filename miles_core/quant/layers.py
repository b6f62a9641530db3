"""Layers that run on quantized weights, and `quantize_model_` that swaps them into a model.

- `Fp8Linear`: float8_e4m3fn weight in 128x128 blocks + fp32 `weight_scale_inv`; activations are
  quantized on the fly in 1x128 tiles. CUDA: Triton act-quant + cuBLAS block-scaled GEMM, or at decode
  sizes act-quant + the dense Triton FP8 kernel (fp8_gemm.fp8_linear); CPU: the reference (dequantize,
  matmul in fp32). An attention's q/k/v Fp8Linear fuse into one GEMM (`GQAttention.fuse_projections_`).
- `Int4Linear`: W4A16, `weight_packed` int32 + `weight_scale` (compressed-tensors layout). CUDA bf16:
  kernels dequantizing in-kernel (M <= 128, `w4a16_gemm.w4a16_linear`); CPU: the reference. With group 128
  it stores its words in column tiles (`w4a16_mma.repack_tiles`, 32 or 64 wide by `repack_width(N)`), which
  the decode kernels read faster (one copy, the same shape); its state_dict and `packed_rows()` give the
  checkpoint's layout.
- `QuantExperts`: the routed experts of one MoE layer (stacked gate_up [E, 2I, H], down [E, H, I])
  in FP8 or INT4, with the same interface as the model core's `Experts` (`forward(x, weights,
  experts)`, `sorted_forward(xs, counts, src)`), running the grouped kernels.

Buffer names equal the HF on-disk names, so a layer's state_dict is its checkpoint slice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.errors import MilesError
from miles_core.quant.fp8 import fp8_block_quantize, tile_fp8_weights, tiles_fit, untile_fp8_weights
from miles_core.quant.hf_format import DEFAULT_KEEP
from miles_core.quant.int4 import int4_group_quantize, pack_int4

__all__ = ["Fp8Linear", "Int4Linear", "QuantExperts", "kernel_scales", "quantize_model_", "refresh_kernel_caches_"]


class Fp8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [N, K] float8_e4m3fn
        self.register_buffer("weight_scale_inv", weight_scale_inv.float())  # [ceil(N/128), ceil(K/128)]
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._scale_b: torch.Tensor | None = None  # cuBLAS layout of the scales, made on first CUDA call

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2: bool = False) -> Fp8Linear:
        q, s = fp8_block_quantize(linear.weight.detach(), pow2=pow2)
        return cls(q, s, linear.bias)

    def forward(self, x: torch.Tensor, xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N]. `xq`: x's rows already quantized to FP8 (see `fp8_gemm.fp8_linear`)."""
        from miles_core.kernels.fp8_gemm import fp8_linear, prepare_weight_scale

        if x.is_cuda and (self._scale_b is None or self._scale_b.device != x.device):
            self._scale_b = prepare_weight_scale(self.weight_scale_inv)
        scale_b = self._scale_b if x.is_cuda else None
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, scale_b, xq=xq)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128"


class Int4Linear(nn.Module):
    def __init__(
        self,
        weight_packed: torch.Tensor,
        weight_scale: torch.Tensor,
        in_features: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        n, words = weight_packed.shape
        self.out_features, self.in_features, self.group_size = n, in_features, group_size
        from miles_core.kernels.w4a16_mma import repack_width

        tile = repack_width(n)
        tiles_fit = group_size == 128 and in_features % 128 == 0 and words * 8 == in_features and n % tile == 0
        self.tile = tile if tiles_fit else 0
        # [N, ceil(K/8)] int32: the checkpoint's words, in `repack_tiles(., tile)`'s order when tile > 0
        self.register_buffer("weight_packed", self._tiles(weight_packed))
        self.register_buffer("weight_scale", weight_scale)  # [N, ceil(K/g)]
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def _tiles(self, rows: torch.Tensor) -> torch.Tensor:
        # the checkpoint's [N, K/8] words -> the stored order, same shape (a permutation of the words)
        from miles_core.kernels.w4a16_mma import repack_tiles

        return repack_tiles(rows, self.tile).view(rows.shape) if self.tile else rows

    def _kernel_packed(self) -> torch.Tensor:
        # what w4a16_linear reads: the stored words as [N/tile, K/128, tile, 16] tiles, or the rows
        if not self.tile:
            return self.weight_packed
        return self.weight_packed.view(self.out_features // self.tile, -1, self.tile, 16)

    def packed_rows(self) -> torch.Tensor:
        """`weight_packed` in the checkpoint's (compressed-tensors) layout [N, ceil(K/8)]."""
        if not self.tile:
            return self.weight_packed
        from miles_core.kernels.w4a16_mma import unpack_tiles

        return unpack_tiles(self._kernel_packed())

    @torch.no_grad()
    def set_packed_(self, rows: torch.Tensor) -> None:
        """Write new packed weights (the checkpoint's layout) into the stored words in place, so CUDA graphs
        captured before read them."""
        self.weight_packed.copy_(self._tiles(rows.to(self.weight_packed.device)))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tile:
            destination[prefix + "weight_packed"] = self.packed_rows()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight_packed"
        rows = state_dict.get(key)
        if self.tile and rows is not None and rows.shape == self.weight_packed.shape:
            state_dict = {**state_dict, key: self._tiles(rows.contiguous())}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, scale_dtype=torch.bfloat16) -> Int4Linear:
        q, s = int4_group_quantize(linear.weight.detach(), group_size, scale_dtype)
        return cls(pack_int4(q), s, linear.in_features, group_size, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from miles_core.kernels.w4a16_gemm import w4a16_linear

        return w4a16_linear(x, self._kernel_packed(), _kernel_scales(self, x), self.group_size, self.bias)

    def extra_repr(self) -> str:
        tiles = f", column tiles of {self.tile}" if self.tile else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}{tiles}"


def _kernel_scales(module: nn.Module, x: torch.Tensor, name: str = "weight_scale") -> torch.Tensor:
    """INT4 scales as the kernel reads them best: on CUDA `kernel_scales`' cached group-major copy."""
    return kernel_scales(module, name) if x.is_cuda else getattr(module, name)


def kernel_scales(module: nn.Module, name: str = "weight_scale") -> torch.Tensor:
    """A group-major copy of an INT4 layer's scales `name` (`w4a16_gemm.group_major`), made once and cached
    on the module; `refresh_kernel_caches_` rewrites it in place when the scales change."""
    scale = getattr(module, name)
    cache = module.__dict__.setdefault("_group_major", {})
    if name not in cache or cache[name].device != scale.device:
        from miles_core.kernels.w4a16_gemm import group_major

        cache[name] = group_major(scale)
    return cache[name]


def refresh_kernel_caches_(module: nn.Module) -> None:
    """After a quantized layer's weights and scales were rewritten in place (`rollout.weights.copy_weights_`),
    rewrite the scale copies its kernels read in place too: INT4's group-major scales (`kernel_scales`) and
    Fp8Linear's cuBLAS scale layout (`_scale_b`). In place, so that CUDA graphs captured before the update,
    which read those copies' storage, see the new scales as eager calls do."""
    from miles_core.kernels.fp8_gemm import prepare_weight_scale
    from miles_core.kernels.w4a16_gemm import group_major

    for name, cached in module.__dict__.get("_group_major", {}).items():
        cached.copy_(group_major(getattr(module, name)))
    scale_b = getattr(module, "_scale_b", None)
    if scale_b is not None:
        scale_b.copy_(prepare_weight_scale(module.weight_scale_inv))


class QuantExperts(nn.Module):
    """Routed experts on FP8 or INT4 weights; drop-in for the model core's `Experts`."""

    def __init__(
        self,
        fmt: str,
        act,
        gate_up: dict[str, torch.Tensor],
        down: dict[str, torch.Tensor],
        hidden: int,
        inter: int,
        group_size: int = 128,
    ):
        super().__init__()
        self.fmt, self.act, self.hidden, self.inter, self.group_size = fmt, act, hidden, inter, group_size
        # FP8 weights in `tile_fp8_weights`' 8 KB boxes where the shapes allow (one copy, the same shape): the GPU
        # kernels stream them faster; the state_dict and `fp8_weight` speak the checkpoint's row-major layout
        self.tiled = fmt == "fp8" and tiles_fit(gate_up["weight"]) and tiles_fit(down["weight"])
        for name, t in gate_up.items():
            self.register_buffer(f"gate_up_{name}", self._tile(t) if name == "weight" else t)
        for name, t in down.items():
            self.register_buffer(f"down_{name}", self._tile(t) if name == "weight" else t)
        self.weight_transform = None  # the Experts interface; quantized weights take no transform

    def _tile(self, rows: torch.Tensor) -> torch.Tensor:
        return tile_fp8_weights(rows) if self.tiled else rows

    def fp8_weight(self, which: str) -> torch.Tensor:
        """`which` ('gate_up' / 'down') FP8 weight [E, N, K] in the checkpoint's layout."""
        w = getattr(self, f"{which}_weight")
        return untile_fp8_weights(w) if self.tiled else w

    @torch.no_grad()
    def set_fp8_weight_(self, which: str, rows: torch.Tensor) -> None:
        """Write new FP8 weights (the checkpoint's layout) into the stored ones in place, so CUDA graphs captured
        before read them."""
        w = getattr(self, f"{which}_weight")
        w.copy_(self._tile(rows.to(w.device)))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:
            for which in ("gate_up", "down"):
                destination[f"{prefix}{which}_weight"] = self.fp8_weight(which)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.tiled:
            state_dict = dict(state_dict)
            for which in ("gate_up", "down"):
                key, mine = f"{prefix}{which}_weight", getattr(self, f"{which}_weight")
                rows = state_dict.get(key)
                if rows is not None and rows.shape == mine.shape:
                    state_dict[key] = self._tile(rows.contiguous())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def from_experts(
        cls, experts: nn.Module, fmt: str, group_size: int = 128, pow2: bool = False, scale_dtype=torch.bfloat16
    ) -> QuantExperts:
        w1, w2 = experts.gate_up_proj.detach(), experts.down_proj.detach()  # [E, 2I, H], [E, H, I]
        e, two_i, h = w1.shape
        if fmt == "fp8":
            if (two_i // 2) % 128:
                raise MilesError(
                    "FP8 experts need moe_intermediate_size divisible by 128 (blocks must not "
                    f"straddle gate and up rows); got {two_i // 2}"
                )
            (q1, s1), (q2, s2) = fp8_block_quantize(w1, pow2=pow2), fp8_block_quantize(w2, pow2=pow2)
            parts = ({"weight": q1, "weight_scale_inv": s1}, {"weight": q2, "weight_scale_inv": s2})
        elif fmt == "int4":
            (q1, s1), (q2, s2) = (int4_group_quantize(w, group_size, scale_dtype) for w in (w1, w2))
            parts = (
                {"weight_packed": pack_int4(q1), "weight_scale": s1},
                {"weight_packed": pack_int4(q2), "weight_scale": s2},
            )
        else:
            raise MilesError(f"unknown quantization format {fmt!r}; use 'fp8' or 'int4'")
        return cls(fmt, experts.act, parts[0], parts[1], h, two_i // 2, group_size)

    def _linear(self, xs: torch.Tensor, which: str, counts: torch.Tensor, src=None) -> torch.Tensor:
        # src (INT4 only): the rows xs[src], gathered by the kernel when it can
        if self.fmt == "fp8":
            from miles_core.kernels.fp8_gemm import grouped_fp8_linear

            w, s = getattr(self, f"{which}_weight"), getattr(self, f"{which}_weight_scale_inv")
            return grouped_fp8_linear(xs, w, s, counts, tiled=self.tiled)
        from miles_core.kernels.w4a16_gemm import grouped_w4a16_linear

        p = getattr(self, f"{which}_weight_packed")
        s = _kernel_scales(self, xs, f"{which}_weight_scale")
        return grouped_w4a16_linear(xs, p, s, counts, self.group_size, src=src)

    def takes_fp8_rows(self, xs: torch.Tensor, rows: int) -> bool:
        """`sorted_forward` would quantize xs's rows to FP8 first (1x128 tiles) on its fused path, so
        a caller that has them quantized already (the norm before the MoE) may pass them as `xq`."""
        from miles_core.kernels import fp8_gemm

        return self.fmt == "fp8" and self.act is F.silu and fp8_gemm.experts_fusion_ok(xs, rows, self.num_experts)

    def sorted_forward(
        self, xs: torch.Tensor, counts: torch.Tensor, src: torch.Tensor | None = None, xq=None
    ) -> torch.Tensor:
        """xs: [M, H] rows sorted by expert (or, with `src` [M], the rows xs[src]), counts: [E] ->
        [M, H] expert outputs (unweighted), in sorted order. `xq`: xs's rows quantized already,
        (q e4m3, scale fp32) as `fp8_gemm.fp8_act_quant` gives them (used where `takes_fp8_rows`).

        CUDA: FP8 silu experts run `fp8_gemm.grouped_fp8_experts` (the gather and SwiGLU folded into
        the act-quant launches), INT4 gathers its rows in the gate_up kernel; the unfused launches' bits."""
        from miles_core.kernels import fp8_gemm
        from miles_core.model.layers import gated

        rows = xs.shape[0] if src is None else src.shape[0]
        if self.takes_fp8_rows(xs, rows):
            w1, s1 = self.gate_up_weight, self.gate_up_weight_scale_inv  # [E, 2I, H] e4m3, its block scales
            w2, s2 = self.down_weight, self.down_weight_scale_inv  # [E, H, I]
            return fp8_gemm.grouped_fp8_experts(xs, counts, w1, s1, w2, s2, src, xq, tiled=self.tiled)
        if src is not None and self.fmt == "fp8":
            xs, src = xs.index_select(0, src), None
        h = self._linear(xs, "gate_up", counts, src)  # [M, 2I]
        return self._linear(gated(self.act, h), "down", counts)  # [M, I] -> [M, H]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, plan=None) -> torch.Tensor:
        """x: [N, H], weights/experts: [N, k] -> [N, H]; the model core's dispatch, quantized GEMMs."""
        from miles_core.model.moe import dispatch

        return dispatch(self.sorted_forward, x, weights, experts, self.num_experts, plan)

    @property
    def num_experts(self) -> int:
        return getattr(self, "gate_up_weight" if self.fmt == "fp8" else "gate_up_weight_packed").shape[0]


def _is_experts(module: nn.Module) -> bool:
    return hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "act")


def quantize_model_(
    model: nn.Module,
    fmt: str,
    group_size: int = 128,
    scope: str | None = None,
    keep: Iterable[str] = DEFAULT_KEEP,
    pow2: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
    """Swap, in place, the model's Linear layers (scope 'linear') and routed experts for quantized
    ones; returns the names swapped. Same selection as the checkpoint writer: `keep` regexes are
    matched against `<module>.weight` (embeddings, lm_head, norms and routers stay high precision).
    Default scope: 'linear' for fp8, 'experts' for int4."""
    if fmt not in ("fp8", "int4"):
        raise MilesError(f"unknown quantization format {fmt!r}; use 'fp8' or 'int4'")
    scope = scope or ("experts" if fmt == "int4" else "linear")
    keep = tuple(keep)
    swaps = []
    for name, module in model.named_modules():
        if _is_experts(module):
            swaps.append((name, QuantExperts.from_experts(module, fmt, group_size, pow2, scale_dtype)))
        elif scope == "linear" and type(module) is nn.Linear:
            if any(re.search(p, f"{name}.weight") for p in keep):
                continue
            if fmt == "fp8":
                swaps.append((name, Fp8Linear.from_linear(module, pow2)))
            else:
                swaps.append((name, Int4Linear.from_linear(module, group_size, scale_dtype)))
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return [n for n, _ in swaps]
