"""Quantized HF checkpoint formats: which tensors get quantized, their on-disk names, the
`quantization_config` blocks, and the way back (`dequantize_hf_tensors`, used by the model loader).

FP8, as DeepSeek-V3 ships it (and transformers' FineGrainedFP8 reads it):
  `<module>.weight` float8_e4m3fn [out, in], `<module>.weight_scale_inv` fp32 [ceil(out/128), ceil(in/128)];
  quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128], "modules_to_not_convert": [...]}.
INT4, compressed-tensors "pack-quantized" W4A16 (as llm-compressor writes it and vLLM's
CompressedTensorsWNA16 reads it): `<module>.weight_packed` int32 [out, ceil(in/8)],
  `<module>.weight_scale` bf16 [out, ceil(in/group)], `<module>.weight_shape` int64 [2];
  quantization_config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {num_bits 4, type int,
  symmetric, strategy group, group_size}}}, "ignore": [...], "quantization_status": "compressed"}.

Routed experts are stored per expert (`...mlp.experts.{e}.{gate,up,down}_proj`), as HF does; a
source that stores them stacked (`...mlp.experts.gate_up_proj` [E, 2I, H]) is split on the way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from miles_core.errors import MilesError
from miles_core.quant.fp8 import BLOCK, FP8_DTYPE, fp8_block_dequantize, fp8_block_quantize
from miles_core.quant.int4 import int4_group_dequantize, int4_group_quantize, pack_int4, unpack_int4

__all__ = [
    "DEFAULT_KEEP",
    "EXPERT_WEIGHT",
    "default_scope",
    "is_selected",
    "split_stacked_experts",
    "quantize_hf_tensor",
    "fp8_quant_config",
    "int4_quant_config",
    "dequantize_hf_tensors",
]

# Kept in high precision whatever the scope: embeddings, the output head, norms, MoE routers
# (`mlp.gate`, Qwen2-MoE's `shared_expert_gate`), DeepSeek MTP's projection/norms.
DEFAULT_KEEP: tuple[str, ...] = (
    r"embed_tokens",
    r"lm_head",
    r"norm",
    r"(^|\.)mlp\.gate\.weight$",
    r"shared_expert_gate",
    r"\.eh_proj\.",
)
EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")
_STACKED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)(\.weight)?$")


def default_scope(fmt: str) -> str:
    """'linear' (every 2-D linear weight) for fp8; 'experts' (routed experts only) for int4, the QAT recipe."""
    return "experts" if fmt == "int4" else "linear"


def is_selected(name: str, t: torch.Tensor, scope: str, keep: Iterable[str] = DEFAULT_KEEP) -> bool:
    """Whether the on-disk tensor `name` is quantized under `scope` ('linear' | 'experts')."""
    if scope not in ("linear", "experts"):
        raise MilesError(f"unknown quantization scope {scope!r}; use 'linear' or 'experts'")
    if not name.endswith(".weight") or t.ndim != 2 or not t.is_floating_point():
        return False
    if any(re.search(p, name) for p in keep):
        return False
    return scope == "linear" or bool(EXPERT_WEIGHT.search(name))


def split_stacked_experts(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Stacked experts -> per-expert HF names; any other tensor comes back as is.

    `<p>.experts.gate_up_proj` [E, 2I, H] -> `<p>.experts.{e}.gate_proj.weight` [I, H] and `up_proj`;
    `<p>.experts.down_proj` [E, H, I] -> `<p>.experts.{e}.down_proj.weight` [H, I].
    """
    m = _STACKED.match(name)
    if m is None or t.ndim != 3:
        return [(name, t)]
    prefix, kind = m.group(1), m.group(2)
    out = []
    for e in range(t.shape[0]):
        if kind == "gate_up_proj":
            gate, up = t[e].chunk(2, dim=0)
            out += [(f"{prefix}.{e}.gate_proj.weight", gate), (f"{prefix}.{e}.up_proj.weight", up)]
        else:
            out.append((f"{prefix}.{e}.down_proj.weight", t[e]))
    return out


def quantize_hf_tensor(
    name: str,
    t: torch.Tensor,
    fmt: str,
    group_size: int = 128,
    pow2: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> list[tuple[str, torch.Tensor]]:
    """One selected `<module>.weight` [out, in] -> its quantized on-disk tensors."""
    module = name[: -len(".weight")]
    if fmt == "fp8":
        q, s = fp8_block_quantize(t, pow2=pow2, what=name)
        return [(name, q), (f"{module}.weight_scale_inv", s)]
    if fmt == "int4":
        q, s = int4_group_quantize(t, group_size, scale_dtype, what=name)
        shape = torch.tensor(list(t.shape), dtype=torch.int64)
        return [
            (f"{module}.weight_packed", pack_int4(q)),
            (f"{module}.weight_scale", s),
            (f"{module}.weight_shape", shape),
        ]
    raise MilesError(f"unknown quantization format {fmt!r}; use 'fp8' or 'int4'")


def fp8_quant_config(not_converted: list[str], pow2: bool = False) -> dict:
    cfg = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
        "modules_to_not_convert": sorted(not_converted),
    }
    if pow2:
        cfg["scale_fmt"] = "ue8m0"  # power-of-two scales, still stored as fp32 (exactly representable)
    return cfg


def int4_quant_config(group_size: int, ignore: list[str], scale_dtype: torch.dtype = torch.bfloat16) -> dict:
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "miles_scale_dtype": str(scale_dtype).removeprefix("torch."),
    }


# ---- the way back -------------------------------------------------------------------------


def _int4_group_size(quant_config: dict) -> int:
    if quant_config.get("format") != "pack-quantized":
        raise MilesError(
            f"compressed-tensors format {quant_config.get('format')!r} is not supported; "
            "miles reads 'pack-quantized' (W4A16)"
        )
    sizes = set()
    for group in (quant_config.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy")) != (4, "int", True, "group"):
            raise MilesError(f"compressed-tensors weights {w} are not symmetric int4 group quantization")
        sizes.add(int(w["group_size"]))
    if len(sizes) != 1:
        raise MilesError(f"expected one int4 group size in quantization_config, found {sorted(sizes)}")
    return sizes.pop()


def dequantize_hf_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], quant_config: dict, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """On-disk quantized tensors -> plain HF-named dense weights (exact dequantized values, in `dtype`).

    Tensors that are not quantized pass through untouched. The pieces of one quantized weight may
    arrive in any order (and from different shards): they are held until complete.
    """
    method = (quant_config or {}).get("quant_method")
    if method == "fp8":
        block = tuple(quant_config.get("weight_block_size") or (BLOCK, BLOCK))
        parts = ("weight", "weight_scale_inv")
    elif method == "compressed-tensors":
        group_size = _int4_group_size(quant_config)
        parts = ("weight_packed", "weight_scale", "weight_shape")
    else:
        raise MilesError(
            f"unsupported quant_method {method!r} in quantization_config; miles reads 'fp8' and 'compressed-tensors'"
        )
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named_tensors:
        module, _, leaf = name.rpartition(".")
        if leaf in ("activation_scale", "input_scale"):
            continue
        if leaf == "weight_zero_point":
            raise MilesError(f"{name}: asymmetric int4 (zero points) is not supported")
        is_part = leaf in parts and not (method == "fp8" and leaf == "weight" and t.dtype != FP8_DTYPE)
        if not is_part:
            yield name, t
            continue
        got = pending.setdefault(module, {})
        got[leaf] = t
        if len(got) < len(parts):
            continue
        del pending[module]
        if method == "fp8":
            w = fp8_block_dequantize(got["weight"], got["weight_scale_inv"], dtype, block=block)
        else:
            rows, cols = (int(v) for v in got["weight_shape"].tolist())
            q = unpack_int4(got["weight_packed"], cols)[:rows]
            w = int4_group_dequantize(q, got["weight_scale"], group_size, dtype)
        yield f"{module}.weight", w
    if pending:
        module, got = next(iter(pending.items()))
        missing = [p for p in parts if p not in got]
        raise MilesError(
            f"quantized checkpoint is incomplete: {module} lacks {missing} ({len(pending)} modules incomplete)"
        )
