"""In-place weight updates from a trainer in the same process: no disk, no second copy.

The cheapest update is none: when the engine was built on the trainer's own model object, its
parameters *are* the trainer's, and an update only bumps the version. Otherwise each incoming
tensor is `copy_`-ed into the engine's existing storage (casting dtype as needed), so the engine
never holds two sets of weights. A layer the engine runs quantized (FP8 / INT4 from
`miles_core.quant`) receives the trainer's high-precision tensor and re-quantizes it into its
existing buffers, the same quantizer the checkpoint writer uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from miles_core.errors import MilesError

__all__ = ["copy_weights_"]

WeightSource = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _named_tensors(source: WeightSource) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(source, nn.Module):
        yield from source.named_parameters()
        for name, buf in source.named_buffers():
            owner, _, attr = name.rpartition(".")
            module = source.get_submodule(owner)
            rows = attr == "weight_packed" and hasattr(module, "packed_rows")  # Int4Linear's stored tile order
            boxes = attr in ("gate_up_weight", "down_weight") and getattr(module, "tiled", False)  # QuantExperts'
            yield name, module.packed_rows() if rows else module.fp8_weight(attr[: -len("_weight")]) if boxes else buf
    elif isinstance(source, Mapping):
        yield from source.items()
    else:
        yield from source


def _requantize(module: nn.Module, attr: str, value: torch.Tensor) -> bool:
    """Quantize `value` into a quantized layer's buffers; False when `module` is not one."""
    try:
        from miles_core.quant import (
            Fp8Linear,
            Int4Linear,
            QuantExperts,
            fp8_block_quantize,
            int4_group_quantize,
            pack_int4,
        )
        from miles_core.quant.layers import refresh_kernel_caches_
    except ImportError:
        return False
    if isinstance(module, Int4Linear) and attr == "weight_packed" and value.shape == module.weight_packed.shape:
        # packed words from an INT4 source, in the checkpoint's layout
        module.set_packed_(value.detach())
        return True
    fp8_experts = isinstance(module, QuantExperts) and module.fmt == "fp8"
    if fp8_experts and attr in ("gate_up_weight", "down_weight") and value.shape == getattr(module, attr).shape:
        # e4m3 weights from an FP8 source, in the checkpoint's layout
        module.set_fp8_weight_(attr[: -len("_weight")], value.detach())
        return True
    if isinstance(module, Fp8Linear | Int4Linear) and attr == "weight":
        prefix = ""
        fmt = "fp8" if isinstance(module, Fp8Linear) else "int4"
    elif isinstance(module, QuantExperts) and attr in ("gate_up_proj", "down_proj"):
        prefix = "gate_up_" if attr == "gate_up_proj" else "down_"
        fmt = module.fmt
    else:
        return False
    scale = getattr(module, f"{prefix}weight_scale_inv" if fmt == "fp8" else f"{prefix}weight_scale")
    w = value.detach().to(scale.device)
    if fmt == "fp8":
        q, s = fp8_block_quantize(w)
        if isinstance(module, QuantExperts):
            module.set_fp8_weight_(prefix[:-1], q)  # in its stored box order
        else:
            getattr(module, f"{prefix}weight").copy_(q)
    else:
        q, s = int4_group_quantize(w, module.group_size, scale.dtype)
        if isinstance(module, Int4Linear):
            module.set_packed_(pack_int4(q))  # in its stored tile order
        else:
            getattr(module, f"{prefix}weight_packed").copy_(pack_int4(q))
    scale.copy_(s)
    refresh_kernel_caches_(module)  # the scale layouts the GPU kernels read, in place (graphs keep them)
    return True


@torch.no_grad()
def copy_weights_(model: nn.Module, source: WeightSource, strict: bool = True) -> int:
    """Copy `source` (a module, a state dict, or (name, tensor) pairs; model-core names) into
    `model`'s existing storage. Returns the number of tensors written; 0 when `source is model`.

    strict: a name the model does not have, or a shape that differs, raises a `MilesError`.
    """
    if source is model:
        return 0
    dest = dict(model.named_parameters(remove_duplicate=False))  # tied weights answer to both names
    dest.update(model.named_buffers(remove_duplicate=False))
    written = 0
    for name, value in _named_tensors(source):
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            owner = None
        if owner is not None and _requantize(owner, attr, value):
            written += 1
            continue
        target = dest.get(name)
        if target is None or tuple(target.shape) != tuple(value.shape):
            if strict:
                got = "no such tensor" if target is None else f"shape {tuple(target.shape)} vs {tuple(value.shape)}"
                raise MilesError(f"weight update: {name}: {got} in the rollout model")
            continue
        if target.data_ptr() != value.data_ptr():
            target.copy_(value)
        written += 1
    return written
