"""Weight sync from the trainer into the rollout engine in the same process, timed and reported.

The engine does the writing (`Engine.update_weights`, miles_core/rollout/weights.py); this side
picks nothing and copies nothing itself, it measures and reports what the update cost:
  - shared: the engine runs the very module object the trainer optimizes (or modules whose
    parameters share its storage). The optimizer's in-place updates are already visible; the
    update only sets the version. Zero bytes, no second copy of the weights.
  - copy: the engine holds its own high-precision copy (another dtype or device): one `copy_`
    per tensor into the engine's existing storage, no allocation.
  - requant: the engine runs FP8 / INT4 layers (miles_core.quant): each trainer weight is
    quantized on the fly into the engine's existing buffers, with the checkpoint writer's quantizer.
The version set is the trainer's step, so every token the engine samples next records it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SyncReport:
    mode: str  # "shared" | "copy" | "requant" (some layers quantized)
    version: int
    tensors: int  # tensors written into the engine (0 when shared)
    source_bytes: int  # bytes of trainer weights pushed (0 when shared)
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.source_bytes / 1e9 / self.seconds if self.seconds > 0 and self.source_bytes else 0.0

    def metrics(self) -> dict[str, float]:
        return {
            "sync/seconds": self.seconds,
            "sync/bytes": float(self.source_bytes),
            "sync/tensors": float(self.tensors),
            "sync/gb_per_s": self.gb_per_s,
            "sync/shared": float(self.mode == "shared"),
            "sync/version": float(self.version),
        }


def engine_module(engine) -> nn.Module:
    """The module an engine generates with (an nn.Module passed directly is its own engine)."""
    if isinstance(engine, nn.Module):
        return engine
    module = getattr(engine, "model", None)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{type(engine).__name__} has no `.model` module to sync weights into")
    return module


def shares_storage(a: nn.Module, b: nn.Module) -> bool:
    """Whether every parameter of `b` lives in the same memory as `a`'s parameter of that name."""
    pa = dict(a.named_parameters())
    return all(n in pa and pa[n].data_ptr() == p.data_ptr() for n, p in b.named_parameters())


def _mode(model: nn.Module, target: nn.Module) -> str:
    if target is model or shares_storage(model, target):
        return "shared"
    try:
        from miles_core.quant import Fp8Linear, Int4Linear, QuantExperts
    except ImportError:
        return "copy"
    quantized = any(isinstance(m, (Fp8Linear, Int4Linear, QuantExperts)) for m in target.modules())
    return "requant" if quantized else "copy"


@torch.no_grad()
def sync_weights(model: nn.Module, engine, version: int) -> SyncReport:
    """Make `engine` generate with `model`'s current weights, tagged `version`; timed (CUDA-synced)."""
    target = engine_module(engine)
    mode = _mode(model, target)
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if hasattr(engine, "update_weights"):
        engine.update_weights(model, version=version)
        written = 0 if mode == "shared" else sum(1 for _ in target.parameters())
    else:  # a bare module: copy into it the way the engine would
        from miles_core.rollout.weights import copy_weights_

        written = copy_weights_(target, model)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nbytes = 0 if mode == "shared" else sum(p.numel() * p.element_size() for p in model.parameters())
    return SyncReport(mode, version, written, nbytes, seconds)
