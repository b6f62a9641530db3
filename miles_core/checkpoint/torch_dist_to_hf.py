"""torch_dist (megatron-core names and layout) -> HF safetensors, streamed one chunk at a time.

The HF tensor list (names, shapes, dtypes) follows from the DCP metadata alone, so each output
shard's header is written first and tensors are streamed into it as their regions are read. Any
torch_dist checkpoint whose keys follow megatron-core's GPTModel layout reads back: written by miles
or by megatron-core (local or Transformer-Engine spec, layers stacked or per layer, any number of
ranks). `iter_hf_tensors` is the same stream for loading a checkpoint straight into a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import torch

from miles_core.checkpoint import megatron_names as mn
from miles_core.checkpoint.folders import (
    copy_side_files,
    find_hf_config_dir,
    local_path,
    remove_stale_temps,
    resolve_iteration_dir,
)
from miles_core.checkpoint.safetensors_io import write_shards
from miles_core.checkpoint.torch_dist_io import TorchDistReader
from miles_core.errors import MilesError
from miles_core.io import atomic_dir
from miles_core.model.config import ModelConfig, read_hf_config


class TorchDistCheckpoint:
    """A torch_dist checkpoint folder seen as HF tensors: `specs()` then `tensors()` in the same order."""

    def __init__(self, ckpt_dir: str, iteration: int | None = None, include_mtp: bool | None = False):
        """`include_mtp`: True = the MTP layers (an error if there are none), None = them if any."""
        ckpt_dir = local_path(ckpt_dir)
        self.iter_dir = resolve_iteration_dir(ckpt_dir, iteration)
        self.config_dir = find_hf_config_dir(ckpt_dir, self.iter_dir)
        self.hf_config = read_hf_config(self.config_dir)
        self.cfg = ModelConfig.from_hf(self.hf_config)
        self.reader = TorchDistReader(self.iter_dir)
        keys = self.reader.tensors
        stacked = not any(mn.PER_LAYER_KEY.match(k) for k in keys)
        self.num_mtp = len({int(m.group(1)) for k in keys if (m := mn.MTP_KEY.match(k))})
        if include_mtp and not self.num_mtp:
            raise MilesError(f"{self.iter_dir} has no MTP layers (mtp.layers.*); drop --include-mtp")
        self.mtp_included = bool(self.num_mtp) and include_mtp is not False
        slots = mn.model_slots(self.cfg, self.num_mtp if self.mtp_included else 0, stacked)
        self.slots = self._resolve(slots)

    def _resolve(self, slots: list[mn.Slot]) -> list[tuple[mn.Slot, str]]:
        out = []
        for s in slots:
            key = mn.resolve_key(s.key, self.reader.tensors)
            if key is None and s.copy_of:
                key = mn.resolve_key(s.copy_of, self.reader.tensors) or "embedding.word_embeddings.weight"
            if key is None:
                if s.optional:
                    continue
                raise MilesError(
                    f"{self.iter_dir} lacks tensor {s.key}; is it a {self.cfg.architecture} "
                    "checkpoint with the config.json beside it?"
                )
            out.append((s, key))
        return out

    def _box(self, slot: mn.Slot, key: str):
        """(offsets, sizes) of the slot's region in `key`, and the unprefixed chunk shape."""
        shape, n_pre = self.reader.shape(key), len(slot.prefix)
        if len(shape) <= n_pre:
            raise MilesError(f"{key} has shape {list(shape)}, not the layout megatron-core writes for it")
        offsets, sizes = mn.chunk_box(slot, shape[n_pre:])
        return offsets, sizes, tuple(sizes[n_pre:])

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(HF name, dtype, shape) of every tensor, in stream order."""
        out = []
        for s, key in self.slots:
            chunk_shape = self._box(s, key)[2]
            for name, shape in zip(s.hf, mn.hf_shapes(s, chunk_shape, self.cfg), strict=True):
                out.append((name, self.reader.dtype(key), shape))
        return out

    def tensors(self, batch_bytes: int = 64 * 2**20) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) pairs, reading regions in batches of about `batch_bytes`."""
        batch, size = [], 0
        for s, key in self.slots:
            batch.append((s, key))
            size += torch.Size(self._box(s, key)[1]).numel() * self.reader.dtype(key).itemsize
            if size >= batch_bytes:
                yield from self._read(batch)
                batch, size = [], 0
        yield from self._read(batch)

    def _read(self, batch):
        if not batch:
            return
        regions = []
        for s, key in batch:
            offsets, sizes, _ = self._box(s, key)
            regions.append((key, offsets, sizes))
        for (s, key), t in zip(batch, self.reader.read(regions), strict=True):
            chunk = t.reshape(self._box(s, key)[2])
            yield from zip(s.hf, mn.split(s, chunk, self.cfg), strict=True)


def iter_hf_tensors(
    ckpt_dir: str, iteration: int | None = None, include_mtp: bool = True
) -> tuple[dict, list[str], Iterator[tuple[str, torch.Tensor]]]:
    """(HF config dict, every HF name, iterator of (HF on-disk name, tensor)) for a torch_dist checkpoint.

    MTP layers are included when `include_mtp` and the checkpoint has them.
    """
    ck = TorchDistCheckpoint(ckpt_dir, iteration, None if include_mtp else False)
    names = [name for name, _, _ in ck.specs()]
    return _hf_config(ck, ck.mtp_included), names, ck.tensors()


def _hf_config(ck: TorchDistCheckpoint, include_mtp: bool) -> dict:
    cfg = dict(ck.hf_config)
    if include_mtp and ck.num_mtp:
        cfg["num_nextn_predict_layers"] = ck.num_mtp
    elif "num_nextn_predict_layers" in cfg:
        cfg["num_nextn_predict_layers"] = 0  # the weights are left out: say so
    return cfg


def torch_dist_to_hf(
    ckpt_dir: str,
    out_dir: str,
    iteration: int | None = None,
    include_mtp: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 2**30,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write the torch_dist checkpoint `ckpt_dir` (its latest or given iteration) as HF safetensors.

    Shards are at most `max_shard_bytes` (one larger tensor gets a shard of its own), with an index
    when there are several; config and tokenizer files are copied from beside the checkpoint.
    """
    ck, out_dir = TorchDistCheckpoint(ckpt_dir, iteration, include_mtp), local_path(out_dir)
    specs = ck.specs()
    total, done = len(specs), [0]

    def on_tensor(_name: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    remove_stale_temps(out_dir)
    with atomic_dir(str(out_dir), overwrite=overwrite) as tmp:
        copy_side_files(ck.config_dir, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_hf_config(ck, include_mtp), f, indent=2)
        write_shards(tmp, specs, ck.tensors(), max_shard_bytes, on_tensor)
    return str(out_dir)


def load_torch_dist(
    ckpt_dir: str, iteration: int | None = None, device="cpu", dtype=torch.float32, include_mtp: bool = True
):
    """A miles model built straight from a torch_dist checkpoint (no HF files written in between)."""
    from miles_core.model import load_model_from_tensors

    config, names, tensors = iter_hf_tensors(ckpt_dir, iteration, include_mtp)
    n_mtp = config.get("num_nextn_predict_layers", 0) if include_mtp else 0
    return load_model_from_tensors(config, tensors, device, dtype, mtp_num_layers=n_mtp, all_names=names)
