"""The quantize stage: HF (or torch_dist) checkpoint -> FP8 or INT4 HF-layout rollout checkpoint.

Streaming: each source tensor is read alone through `safetensors.safe_open`, quantized, and added
to an output shard that is flushed at `shard_bytes`; the whole model is never in memory. The output
directory is written under a temporary name and renamed into place when complete
(`miles_core.io.atomic_dir`), with config.json (plus its `quantization_config`) and every other
non-weight file of the source (tokenizer, generation config, chat template) copied along.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors.torch import save_file

from miles_core.errors import MilesError
from miles_core.io import atomic_dir
from miles_core.model.loader import iter_hf_tensors
from miles_core.quant.hf_format import (
    DEFAULT_KEEP,
    default_scope,
    fp8_quant_config,
    int4_quant_config,
    is_selected,
    quantize_hf_tensor,
    split_stacked_experts,
)

__all__ = ["quantize_checkpoint"]

_WEIGHT_FILES = {"model.safetensors.index.json", "config.json"}


class _ShardWriter:
    """Collects tensors into safetensors shards of about `shard_bytes` each."""

    def __init__(self, out_dir: str, shard_bytes: int):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.current and self.size + nbytes > self.shard_bytes:
            self._flush()
        self.current[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        save_file(self.current, os.path.join(self.out_dir, f".shard-{len(self.shards)}"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.size = {}, 0

    def close(self) -> None:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.rename(os.path.join(self.out_dir, ".shard-0"), os.path.join(self.out_dir, "model.safetensors"))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.out_dir, f".shard-{i}"), os.path.join(self.out_dir, fname))
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def _is_torch_dist(path: str) -> bool:
    return os.path.exists(os.path.join(path, "latest_checkpointed_iteration.txt")) or os.path.exists(
        os.path.join(path, ".metadata")
    )


@contextlib.contextmanager
def _as_hf_dir(src: str, scratch: str) -> Iterator[str]:
    """Yield an HF folder for `src`: itself, or a temporary conversion of a torch_dist checkpoint
    (written under `scratch`, beside the output, where there is room for a model)."""
    if not os.path.isdir(src):
        raise MilesError(f"checkpoint {src} does not exist or is not a directory")
    if os.path.exists(os.path.join(src, "config.json")) and any(n.endswith(".safetensors") for n in os.listdir(src)):
        yield src
        return
    if not _is_torch_dist(src):
        raise MilesError(f"{src} is neither an HF checkpoint (config.json + *.safetensors) nor a torch_dist one")
    try:
        from miles_core.checkpoint import torch_dist_to_hf
    except ImportError as e:
        raise MilesError(
            f"{src} is a torch_dist checkpoint, and this build has no torch_dist -> HF converter "
            "(miles_core.checkpoint.torch_dist_to_hf); convert it to HF first"
        ) from e
    os.makedirs(scratch, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".miles-quant-src-", dir=scratch) as tmp:
        hf = os.path.join(tmp, "hf")
        torch_dist_to_hf(src, hf)
        yield hf


def _quantized_stream(
    tensors: Iterable[tuple[str, torch.Tensor]],
    fmt: str,
    scope: str,
    keep,
    group_size: int,
    pow2: bool,
    scale_dtype: torch.dtype,
    kept: list[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    for src_name, src_t in tensors:
        for name, t in split_stacked_experts(src_name, src_t):
            if is_selected(name, t, scope, keep):
                yield from quantize_hf_tensor(name, t, fmt, group_size, pow2, scale_dtype)
            else:
                if name.endswith(".weight") and t.ndim == 2:
                    kept.append(name[: -len(".weight")])
                yield name, t


def quantize_checkpoint(
    src: str,
    out_dir: str,
    format: str = "fp8",
    group_size: int = 128,
    *,
    scope: str | None = None,
    keep: Iterable[str] = DEFAULT_KEEP,
    pow2_scales: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 << 30,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Write the FP8 or INT4 rollout checkpoint of `src` to `out_dir`; returns out_dir.

    format: 'fp8' (DeepSeek-V3 128x128 blocks) or 'int4' (compressed-tensors W4A16, `group_size`).
    scope: 'linear' (every linear weight) or 'experts' (routed experts only); default 'linear' for
    fp8 and 'experts' for int4 (what INT4 QAT trains). `keep`: regexes of weights that stay in
    high precision (embeddings, lm_head, norms and routers by default).
    """
    if format not in ("fp8", "int4"):
        raise MilesError(f"unknown quantization format {format!r}; use 'fp8' or 'int4'")
    if format == "int4" and (group_size <= 0 or group_size % 8):
        raise MilesError(f"int4 group size must be a positive multiple of 8, got {group_size}")
    scope = scope or default_scope(format)
    keep = tuple(keep)
    with _as_hf_dir(str(src), os.path.dirname(os.path.abspath(str(out_dir)))) as hf_dir:
        with open(os.path.join(hf_dir, "config.json")) as f:
            config = json.load(f)
        if config.get("quantization_config"):
            raise MilesError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
        with atomic_dir(str(out_dir), overwrite=overwrite) as tmp:
            writer, kept = _ShardWriter(tmp, shard_bytes), []
            stream = _quantized_stream(
                iter_hf_tensors(hf_dir), format, scope, keep, group_size, pow2_scales, scale_dtype, kept
            )
            for name, t in stream:
                writer.add(name, t)
                if progress is not None:
                    progress(name)
            writer.close()
            if format == "fp8":
                config["quantization_config"] = fp8_quant_config(kept, pow2_scales)
            else:
                config["quantization_config"] = int4_quant_config(group_size, kept, scale_dtype)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            _copy_side_files(hf_dir, tmp)
    return str(out_dir)


def _copy_side_files(src: str, dst: str) -> None:
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if name in _WEIGHT_FILES or name.endswith(".safetensors") or name.startswith(".") or not os.path.isfile(path):
            continue
        shutil.copy2(path, os.path.join(dst, name))
