"""Saving a model as an HF checkpoint folder (safetensors shards + index, config.json, tokenizer).

Tensors stream out one at a time in HF's on-disk names (`miles_to_hf`: experts unstacked), into
size-bounded shards, inside a temporary folder renamed into place only when complete.
"""

from __future__ import annotations

import json
import os

import torch

from miles_core.io import atomic_dir
from miles_core.model.weights import miles_to_hf


def save_hf_checkpoint(
    model,
    out_dir: str,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    include_mtp: bool = True,
) -> str:
    """Write `model` (its `config.raw` as config.json) to `out_dir`; returns out_dir."""
    from miles_core.checkpoint.safetensors_io import write_shards

    def tensors():
        for name, t in miles_to_hf(model):
            if not include_mtp and _is_mtp(model, name):
                continue
            t = t.detach().to("cpu")
            yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors()]
    config = dict(model.config.raw)
    n_mtp = len(model.mtp.layers) if (model.mtp is not None and include_mtp) else 0
    if model.config.architecture == "DeepseekV3ForCausalLM":
        config["num_nextn_predict_layers"] = n_mtp
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(tmp, specs, tensors(), max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def _is_mtp(model, hf_name: str) -> bool:
    parts = hf_name.split(".")
    return len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= model.config.num_hidden_layers
