"""The on-disk layout of a miles torch_dist checkpoint, the same as a Megatron-LM one:

    CKPT/
      latest_checkpointed_iteration.txt     "0" (or "release")
      iter_0000000/  (or release/)          one megatron-core dist checkpoint:
        .metadata, __0_*.distcp               torch.distributed.checkpoint shards and metadata
        metadata.json                         {"sharded_backend": "torch_dist", ...}
        common.pt                             the non-sharded part: checkpoint_version, iteration, miles info
      config.json, tokenizer files ...      the HF side files, so later stages need nothing else
      miles_checkpoint.json                 how it was written: spec, layer layout, MTP layers, source

Megatron-LM's loader asserts that the tracker holds an iteration > 0 or "release"; pass
`release=True` to write `release/` for it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from miles_core.errors import MilesError

TRACKER = "latest_checkpointed_iteration.txt"
INFO = "miles_checkpoint.json"
MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
# HF files that travel with the weights (not the weights themselves).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def local_path(url) -> str:
    """A local path from a plain path or a `file://` URL; other fsspec protocols are refused clearly
    (conversion reads with positioned reads and renames atomically, which need a local filesystem)."""
    url = os.fspath(url)
    if "://" not in url:
        return url
    protocol, rest = url.split("://", 1)
    if protocol in ("file", "local"):
        return rest
    raise MilesError(f"{url}: checkpoint conversion needs a local path; copy the checkpoint to local disk first")


def iter_dir_name(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def copy_side_files(src: str, dst: str, missing_only: bool = False) -> list[str]:
    """Copy the HF side files (config, tokenizer, chat template) from `src` to `dst`; returns their names.
    `missing_only` keeps files `dst` already has."""
    copied = []
    for name in SIDE_FILES:
        p, q = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isfile(p) and not (missing_only and os.path.exists(q)):
            shutil.copy2(p, q)
            copied.append(name)
    return copied


def write_megatron_files(ckpt: str, iteration: int | None, common: dict, info: dict) -> None:
    """metadata.json + common.pt inside the iteration folder, the tracker and miles info beside it."""
    d = os.path.join(ckpt, iter_dir_name(iteration))
    with open(os.path.join(d, "metadata.json"), "w") as f:
        json.dump(MEGATRON_METADATA, f)
    torch.save(common, os.path.join(d, "common.pt"))
    with open(os.path.join(ckpt, INFO), "w") as f:
        json.dump(info, f, indent=2)
    # Last: a tracker is what makes the folder look like a finished checkpoint.
    with open(os.path.join(ckpt, TRACKER), "w") as f:
        f.write("release" if iteration is None else str(iteration))


def resolve_iteration_dir(ckpt: str, iteration: int | None = None) -> str:
    """The iteration folder to read: `iteration` if given, else the tracker's; clear errors otherwise."""
    if not os.path.isdir(ckpt):
        raise MilesError(f"{ckpt} does not exist or is not a folder")
    if iteration is None:
        tracker = os.path.join(ckpt, TRACKER)
        if os.path.exists(tracker):
            with open(tracker) as f:
                text = f.read().strip()
            if text != "release" and not text.isdigit():
                raise MilesError(f"{tracker} holds {text!r}, neither an iteration number nor 'release'")
            d = os.path.join(ckpt, "release" if text == "release" else iter_dir_name(int(text)))
        elif os.path.exists(os.path.join(ckpt, ".metadata")):
            d = ckpt  # pointed at an iteration folder itself
        else:
            found = sorted(glob.glob(os.path.join(ckpt, "iter_*")))
            hint = (
                f" (iteration folders: {', '.join(os.path.basename(x) for x in found)}; pass --iteration)"
                if found
                else ""
            )
            raise MilesError(f"{ckpt} is not a torch_dist checkpoint: no {TRACKER}{hint}")
    else:
        d = os.path.join(ckpt, iter_dir_name(iteration))
    if not os.path.exists(os.path.join(d, ".metadata")):
        raise MilesError(f"{d} is not a complete torch_dist checkpoint: no .metadata file")
    meta = os.path.join(d, "metadata.json")
    if os.path.exists(meta):
        with open(meta) as f:
            backend = json.load(f).get("sharded_backend")
        if backend != "torch_dist":
            raise MilesError(f"{d} uses sharded_backend={backend!r}; only torch_dist is supported")
    return d


def find_hf_config_dir(ckpt: str, iter_dir: str) -> str:
    for d in (ckpt, iter_dir, os.path.dirname(os.path.abspath(ckpt))):
        if os.path.exists(os.path.join(d, "config.json")):
            return d
    raise MilesError(
        f"{ckpt} has no HF config.json beside it; copy the original model's config.json (and tokenizer) there"
    )


def remove_stale_temps(out_dir: str) -> None:
    """Delete leftovers `.NAME.tmp-*` of earlier killed conversions to the same output."""
    head, tail = os.path.split(os.path.abspath(out_dir).rstrip("/"))
    for p in glob.glob(os.path.join(head, f".{tail}.tmp-*")):
        shutil.rmtree(p, ignore_errors=True)
