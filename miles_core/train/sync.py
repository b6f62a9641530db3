"""Weight sync from the trainer into a rollout engine in the same process, timed.

Three ways, chosen per tensor by what the engine holds:
  - shared: the engine runs the very same module object as the trainer. Nothing is copied; the
    optimizer's in-place updates are already visible to the engine. Zero bytes, no second copy.
  - copy: the engine has its own high-precision module (e.g. bf16 weights for an fp32 trainer, or
    another device). One `copy_` per tensor into the engine's existing storage (no allocation, so
    the engine's CUDA graphs and cached pointers stay valid).
  - requant: the engine's layer is FP8 (`Fp8Linear`) or INT4 (`Int4Linear`, `QuantExperts`). The
    trainer's weight is quantized on the fly with the same functions that write the rollout
    checkpoint (miles_core.quant), one layer at a time, and copied into the engine's buffers.
The engine's weight version is then set, so every sample it generates next records it.

Engine interface used (duck-typed): `engine.model` (or the engine itself, if it is a module), and
for the version `engine.update_weights(version=...)` when it exists, else `engine.weight_version`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class SyncReport:
    mode: str  # "shared" | "copy" | "requant" | "copy+requant"
    version: int
    tensors: int  # tensors written into the engine
    bytes: int  # bytes written into the engine
    source_bytes: int  # bytes of the trainer weights that were synced
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.source_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def metrics(self) -> dict[str, float]:
        d = asdict(self)
        mode = d.pop("mode")
        out = {f"sync/{k}": float(v) for k, v in d.items()}
        out["sync/gb_per_s"] = self.gb_per_s
        out["sync/shared"] = float(mode == "shared")
        return out


def engine_module(engine) -> nn.Module:
    if isinstance(engine, nn.Module):
        return engine
    module = getattr(engine, "model", None)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{type(engine).__name__} has no `.model` module to sync weights into")
    return module


def shares_storage(a: nn.Module, b: nn.Module) -> bool:
    """Whether every parameter of `b` is stored in the same memory as `a`'s parameter of that name."""
    pa = dict(a.named_parameters())
    return all(n in pa and pa[n].data_ptr() == p.data_ptr() for n, p in b.named_parameters())


@torch.no_grad()
def sync_weights(model: nn.Module, engine, version: int, *, pow2: bool = False) -> SyncReport:
    """Make `engine` generate with `model`'s current weights, tagged `version`. See the module doc."""
    target = engine_module(engine)
    sync = _cuda_sync(model)
    sync()
    t0 = time.perf_counter()
    if target is model or shares_storage(model, target):
        report = SyncReport("shared", version, 0, 0, 0, 0.0)
    else:
        report = _copy_into(model, target, version, pow2)
    sync()
    report.seconds = time.perf_counter() - t0
    _set_version(engine, version)
    return report


def _cuda_sync(model: nn.Module):
    p = next(model.parameters(), None)
    if p is not None and p.is_cuda:
        return torch.cuda.synchronize
    return lambda: None


def _copy_into(model: nn.Module, target: nn.Module, version: int, pow2: bool) -> SyncReport:
    from miles_core.quant import Fp8Linear, Int4Linear, QuantExperts

    src_modules = dict(model.named_modules())
    totals = [0, 0, 0]  # tensors, engine bytes, trainer bytes
    modes = set()
    for name, dst in target.named_modules():
        src = src_modules.get(name)
        if isinstance(dst, (Fp8Linear, Int4Linear, QuantExperts)):
            counts = _requant(src, dst, pow2)
            modes.add("requant")
        else:
            counts = _copy_module(src, dst, name)
            if counts[0]:
                modes.add("copy")
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
    return SyncReport("+".join(sorted(modes)) or "shared", version, *totals, 0.0)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _copy_module(src: nn.Module | None, dst: nn.Module, name: str) -> tuple[int, int, int]:
    """copy_ the module's own parameters and buffers (not its children's) from the trainer's."""
    own = list(dst.named_parameters(recurse=False)) + list(dst.named_buffers(recurse=False))
    if not own:
        return 0, 0, 0
    if src is None:
        raise KeyError(f"trainer model has no module {name!r} to sync into the engine")
    src_t = dict(src.named_parameters(recurse=False)) | dict(src.named_buffers(recurse=False))
    done_dst, done_src = [], []
    for tname, t in own:
        if tname not in src_t:
            raise KeyError(f"trainer model has no tensor {name}.{tname} to sync into the engine")
        if src_t[tname] is t:
            continue  # shared tensor
        t.copy_(src_t[tname])
        done_dst.append(t)
        done_src.append(src_t[tname])
    return len(done_dst), _nbytes(done_dst), _nbytes(done_src)


def _requant(src: nn.Module | None, dst: nn.Module, pow2: bool) -> tuple[int, int, int]:
    """Quantize the trainer's layer like the engine's one, then copy into the engine's buffers."""
    from miles_core.quant import Fp8Linear, Int4Linear, QuantExperts

    if src is None:
        raise KeyError("engine has a quantized layer the trainer model does not have")
    if isinstance(dst, QuantExperts):
        kw = {"scale_dtype": dst.gate_up_weight_scale.dtype} if dst.fmt == "int4" else {}
        fresh = QuantExperts.from_experts(src, dst.fmt, dst.group_size, pow2=pow2, **kw)
        sources = [src.gate_up_proj, src.down_proj]
    elif isinstance(dst, Fp8Linear):
        fresh, sources = Fp8Linear.from_linear(src, pow2=pow2), [src.weight]
        dst._scale_b = None  # the cuBLAS layout of the scales is rebuilt from the new ones on next use
    else:
        fresh, sources = Int4Linear.from_linear(src, dst.group_size, dst.weight_scale.dtype), [src.weight]
    bufs = [buf for _, buf in dst.named_buffers(recurse=False)]
    for bname, buf in dst.named_buffers(recurse=False):
        buf.copy_(getattr(fresh, bname))
    if getattr(dst, "bias", None) is not None and src.bias is not None:
        dst.bias.copy_(src.bias)
    return len(bufs), _nbytes(bufs), _nbytes(sources)


def _set_version(engine, version: int) -> None:
    update = getattr(engine, "update_weights", None)
    if callable(update):
        update(version=version)
    elif not isinstance(engine, nn.Module) or hasattr(engine, "weight_version"):
        engine.weight_version = version
