"""The pipeline's stages as plain functions: `stage(out_dir, **inputs, **params) -> metrics`.

Each writes one artifact into `out_dir` (a local folder the caller publishes) and returns a dict of
metrics; inputs are local paths of upstream artifacts. They know nothing of Prefect: tasks/ wraps
them with retries, caching and the manifest, and tests call them directly.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

Progress = Callable[[float], None] | None


def _fraction(on_progress: Progress):
    if on_progress is None:
        return None
    return lambda done, total: on_progress(done / max(total, 1))


def build_base(out_dir: str, demo: dict[str, Any], on_progress: Progress = None) -> dict[str, Any]:
    """The demo base model (see miles_core.demo)."""
    from miles_core.demo import build_demo_base

    return build_demo_base(out_dir, demo, on_progress)


def convert(out_dir: str, hf: str, mtp_num_layers: int = 0, on_progress: Progress = None) -> dict[str, Any]:
    """HF checkpoint -> torch_dist (iter_0000000), the training state's format."""
    from miles_core.checkpoint import hf_to_torch_dist

    hf_to_torch_dist(hf, out_dir, mtp_num_layers=mtp_num_layers, overwrite=True, progress=_fraction(on_progress))
    return {"bytes": _size(out_dir)}


def rollout_weights(out_dir: str, ckpt: str, format: str = "int4", group_size: int = 128) -> dict[str, Any]:
    """torch_dist checkpoint -> the rollout engine's weights: FP8 / INT4 HF checkpoint, or bf16/fp32 HF.

    This is the artifact form of weight sync: after each train step the new checkpoint is
    re-quantized exactly as the trainer's QAT fake-quant sees it.
    """
    if format == "none":
        from miles_core.checkpoint import torch_dist_to_hf

        torch_dist_to_hf(ckpt, out_dir, overwrite=True)
    else:
        from miles_core.quant import quantize_checkpoint

        quantize_checkpoint(ckpt, out_dir, format=format, group_size=group_size, overwrite=True)
    return {"format": format, "bytes": _size(out_dir)}


def export(out_dir: str, ckpt: str) -> dict[str, Any]:
    """The final torch_dist checkpoint -> HF safetensors (loadable by transformers)."""
    from miles_core.checkpoint import torch_dist_to_hf

    torch_dist_to_hf(ckpt, out_dir, overwrite=True)
    return {"bytes": _size(out_dir)}


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _copy_tree(src: str, dst: str) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
