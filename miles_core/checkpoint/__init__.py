"""Checkpoint conversion: HF safetensors <-> torch_dist (megatron-core names and layout), MTP layers.

    hf_to_torch_dist(hf_dir, out_dir, mtp_num_layers=0)      HF -> CKPT/iter_0000000 (+ tracker, HF side files)
    torch_dist_to_hf(ckpt_dir, out_dir, iteration=None, include_mtp=False)
    iter_hf_tensors(ckpt_dir)                                 (HF config, stream of (HF name, tensor))
    load_torch_dist(ckpt_dir)                                 a miles model straight from torch_dist

Both directions stream one chunk at a time and write atomically (temporary name, then rename).
Names and layouts: megatron_names.py; folder layout: folders.py.
"""

from miles_core.checkpoint.hf_to_torch_dist import hf_to_torch_dist
from miles_core.checkpoint.torch_dist_to_hf import (
    TorchDistCheckpoint,
    iter_hf_tensors,
    load_torch_dist,
    torch_dist_to_hf,
)

__all__ = ["TorchDistCheckpoint", "hf_to_torch_dist", "iter_hf_tensors", "load_torch_dist", "torch_dist_to_hf"]
