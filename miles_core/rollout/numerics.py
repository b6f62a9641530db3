"""Numerics modes of the engine: `default` now, `bitwise` on-policy later (not built yet).

`default` shares the trainer's modules and recipe (same weights, same log-prob formula), so the
train-rollout mismatch is rounding only: the engine's batch shapes (decode of one token over a
cache vs the trainer's full sequence) pick different kernel tilings and reduction orders.

`bitwise` will remove that too: rollout and training both run batch-invariant kernels (matmul,
attention, RMSNorm, softmax and the MoE grouped GEMM with a fixed reduction order, independent of
the batch size and of the position of a row in the batch), so the trainer's recomputed log-probs
equal the engine's bit for bit and the importance ratio is exactly 1 for fresh tokens. The hook
is `EngineConfig.numerics`; kernels come from `miles_core.kernels` behind one switch shared with
the trainer.
"""

from __future__ import annotations

from typing import Literal

from miles_core.errors import MilesError

__all__ = ["NUMERICS", "Numerics", "check_numerics"]

Numerics = Literal["default", "bitwise"]
NUMERICS = ("default", "bitwise")


def check_numerics(mode: str) -> None:
    if mode == "bitwise":
        raise MilesError("numerics='bitwise' (batch-invariant kernels shared with the trainer) is not available yet")
    if mode not in NUMERICS:
        raise MilesError(f"numerics must be one of {NUMERICS}, got {mode!r}")
