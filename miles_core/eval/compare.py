"""Comparing two evaluations: per-metric deltas with paired bootstrap confidence intervals.

Two checkpoints evaluated on the same prompts differ far less than their separate error bars
suggest, because prompt difficulty is shared; the paired bootstrap resamples prompts (the same
resample for both) and takes percentiles of the mean per-prompt difference. Only prompts present
in both evaluations count; how many were left out is reported. Seeded, so reruns agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from miles_core.errors import MilesError
from miles_core.eval.evaluate import EvalResult

__all__ = ["compare_evaluations", "paired_bootstrap"]


def paired_bootstrap(
    base: np.ndarray, new: np.ndarray, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean delta, CI low, CI high) of `new - base` over paired per-prompt values."""
    diff = np.asarray(new, dtype=np.float64) - np.asarray(base, dtype=np.float64)  # [P]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))  # [n_boot, P]
    means = diff[idx].mean(axis=1)  # [n_boot]
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(low), float(high)


def compare_evaluations(
    base: EvalResult, new: EvalResult, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """Deltas `new - base` for every metric both evaluations have, on their shared prompts."""
    a, b = _by_prompt(base), _by_prompt(new)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise MilesError("the two evaluations share no prompt_id; compare evaluations of the same prompts")
    metrics = [m for m in _metric_columns(base) if m in _metric_columns(new)]
    out: dict[str, Any] = {
        "n_paired": len(shared),
        "only_in_base": len(set(a) - set(b)),
        "only_in_new": len(set(b) - set(a)),
        "n_boot": n_boot,
        "seed": seed,
        "confidence": confidence,
        "metrics": {},
    }
    for m in metrics:
        x = np.array([a[p][m] for p in shared])
        y = np.array([b[p][m] for p in shared])
        delta, low, high = paired_bootstrap(x, y, n_boot, seed, confidence)
        out["metrics"][m] = {
            "base": float(x.mean()),
            "new": float(y.mean()),
            "delta": delta,
            "ci_low": low,
            "ci_high": high,
            "significant": not (low <= 0.0 <= high),
        }
    return out


def _metric_columns(result: EvalResult) -> list[str]:
    names = result.per_prompt.column_names
    return [c for c in names if c == "mean_reward" or c.startswith(("pass@", "maj@"))]


def _by_prompt(result: EvalResult) -> dict[str, dict[str, Any]]:
    return {row["prompt_id"]: row for row in result.per_prompt.to_pylist()}
