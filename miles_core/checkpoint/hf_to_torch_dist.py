"""HF safetensors -> torch_dist (megatron-core names and layout), streamed one chunk at a time.

Each megatron chunk (one layer's fused qkv, one expert's gate rows, ...) is described up front from
the safetensors headers alone; DCP then asks for the chunks one by one while writing, and each is
read from disk just then (see torch_dist_io). Peak memory is a few chunks plus one output file's
bookkeeping (`max_file_bytes`), whatever the model size.

MTP layers come from the HF checkpoint when it has them (DeepSeek-V3's `model.layers.{L+k}`).
Otherwise `mtp_num_layers=N` creates N fresh ones, initialised as miles' MTP initialiser defines
(miles_core/model/mtp.py): norms to one, biases and the router's correction bias to zero, every
other weight normal(0, initializer_range), seeded per tensor name so reruns write the same bytes.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable

import torch

from miles_core.checkpoint import megatron_names as mn
from miles_core.checkpoint.folders import (
    copy_side_files,
    iter_dir_name,
    local_path,
    remove_stale_temps,
    write_megatron_files,
)
from miles_core.checkpoint.safetensors_io import SafetensorsReader
from miles_core.checkpoint.torch_dist_io import Chunk, write_chunks
from miles_core.errors import MilesError
from miles_core.io import atomic_dir
from miles_core.model.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_COMPARE_BYTES = 64 * 2**20


def hf_to_torch_dist(
    hf_dir: str,
    out_dir: str,
    mtp_num_layers: int = 0,
    iteration: int | None = 0,
    overwrite: bool = False,
    max_file_bytes: int = 256 * 2**20,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Convert the HF checkpoint in `hf_dir` to a torch_dist checkpoint at `out_dir`; returns out_dir.

    `iteration=None` writes `release/` instead of `iter_0000000/`. `progress(done_bytes, total_bytes)`
    is called after each chunk.
    """
    hf_dir, out_dir = local_path(hf_dir), local_path(out_dir)
    if not os.path.isdir(hf_dir):
        raise MilesError(f"{hf_dir} does not exist or is not a folder; pass an HF checkpoint folder")
    cfg = ModelConfig.from_hf(hf_dir)
    reader = SafetensorsReader(hf_dir)
    source = _Source(cfg, reader, _mtp_count(reader, cfg, mtp_num_layers))
    stacked = mn.is_stacked(cfg)
    slots = _present_slots(mn.model_slots(cfg, source.num_mtp, stacked), source, reader)
    _check_all_used(slots, reader, cfg)
    chunks = _chunks(slots, source, cfg)
    total = sum(c.nbytes for c in chunks)
    done = [0]

    def on_item(c: Chunk) -> None:
        done[0] += c.nbytes
        if progress is not None:
            progress(done[0], total)

    def produce(c: Chunk) -> torch.Tensor:
        slot = c.ref
        return mn.fuse(slot, [source.read(n) for n in slot.hf], cfg).reshape(c.sizes)

    objects = {k: [None] for k in mn.extra_state_keys(slots)}
    info = {
        "format": "torch_dist",
        "megatron_spec": "local (get_gpt_decoder_block_spec(use_transformer_engine=False), RMSNorm)",
        "layers": "stacked" if stacked else "per_layer",
        "architecture": cfg.architecture,
        "mtp_num_layers": source.num_mtp,
        "mtp_source": "hf" if source.hf_mtp else ("created" if source.num_mtp else "none"),
        "source": os.path.abspath(hf_dir),
        "total_bytes": total,
    }
    common = {"checkpoint_version": 3.0, "iteration": iteration or 0, "miles": info}
    remove_stale_temps(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        it_dir = os.path.join(tmp, iter_dir_name(iteration))
        os.makedirs(it_dir)
        write_chunks(it_dir, chunks, produce, objects, max_file_bytes, on_item)
        copy_side_files(hf_dir, tmp)
        write_megatron_files(tmp, iteration, common, info)
    return out_dir


def _mtp_count(reader: SafetensorsReader, cfg: ModelConfig, requested: int) -> tuple[int, bool]:
    ids = {int(m.group(1)) for n in reader.names() if (m := _LAYER.match(n)) and m.group(2) == "eh_proj.weight"}
    ids = {i for i in ids if i >= cfg.num_hidden_layers}
    if ids:
        if requested and requested != len(ids):
            raise MilesError(
                f"the checkpoint has {len(ids)} MTP layer(s) but --mtp-num-layers {requested} was given; "
                "drop the option to keep the checkpoint's"
            )
        return len(ids), True
    if requested < 0:
        raise MilesError(f"--mtp-num-layers must be >= 0, got {requested}")
    return requested, False


class _Source:
    """HF tensors by on-disk name: read from the checkpoint, or made for freshly created MTP layers."""

    def __init__(self, cfg: ModelConfig, reader: SafetensorsReader, mtp: tuple[int, bool]):
        self.cfg, self.reader = cfg, reader
        self.num_mtp, self.hf_mtp = mtp
        self.std = float(cfg.raw.get("initializer_range", 0.02))
        self.dtype = (
            reader.tensors["model.embed_tokens.weight"].dtype
            if "model.embed_tokens.weight" in reader
            else torch.float32
        )

    def created(self, name: str) -> bool:
        m = _LAYER.match(name)
        return not self.hf_mtp and m is not None and int(m.group(1)) >= self.cfg.num_hidden_layers

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.reader:
            return self.reader.tensors[name].shape
        if not self.created(name):
            return None
        rest, h = _LAYER.match(name).group(2), self.cfg.hidden_size
        if rest in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
            return (h,)
        if rest == "eh_proj.weight":
            return (h, 2 * h)
        twin = f"model.layers.{self.cfg.num_hidden_layers - 1}.{rest}"  # MTP layer mirrors the last layer
        return self.reader.tensors[twin].shape if twin in self.reader else None

    def dtype_of(self, name: str) -> torch.dtype:
        return self.reader.tensors[name].dtype if name in self.reader else self.dtype

    def read(self, name: str) -> torch.Tensor:
        if name in self.reader:
            return self.reader.read(name)
        shape, rest = self.shape(name), _LAYER.match(name).group(2)
        if "norm" in rest:
            return torch.ones(shape, dtype=self.dtype)
        if rest.endswith(".bias") or rest.endswith("e_score_correction_bias"):
            return torch.zeros(shape, dtype=self.dtype)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g) * self.std).to(self.dtype)


def _present_slots(slots: list[mn.Slot], source: _Source, reader: SafetensorsReader) -> list[mn.Slot]:
    out = []
    for s in slots:
        have = [source.shape(n) is not None for n in s.hf]
        if s.copy_of:
            if all(have) and not source.created(s.hf[0]) and not _same(reader, s.hf[0], _main_name(s.copy_of)):
                out.append(s)  # a copy that differs from the shared tensor: keep it to stay bit-exact
            continue
        if all(have):
            out.append(s)
        elif not s.optional or any(have):
            missing = [n for n, h in zip(s.hf, have, strict=True) if not h]
            raise MilesError(
                f"the checkpoint lacks tensor {missing[0]}; is it complete and of the architecture "
                f"its config.json names ({source.cfg.architecture})?"
            )
    return out


_UNUSED_OK = re.compile(r"(rotary_emb\.inv_freq|\.embed_tokens\.weight|\.shared_head\.head\.weight)$")


def _check_all_used(slots: list[mn.Slot], reader: SafetensorsReader, cfg: ModelConfig) -> None:
    """Every tensor of the checkpoint must land somewhere: never drop weights silently."""
    used = {n for s in slots for n in s.hf}
    extra = [n for n in reader.names() if n not in used and not _UNUSED_OK.search(n)]
    if not extra:
        return
    if cfg.raw.get("quantization_config") or any(n.endswith(("weight_scale_inv", "weight_scale")) for n in extra):
        raise MilesError(f"the checkpoint is quantized ({extra[0]}); convert the bf16 checkpoint instead")
    more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
    raise MilesError(
        f"the checkpoint has tensor {extra[0]}{more} that {cfg.architecture} does not use; "
        "is config.json the one that belongs to these weights?"
    )


def _main_name(megatron_key: str) -> str:
    return {"embedding.word_embeddings.weight": "model.embed_tokens.weight", "output_layer.weight": "lm_head.weight"}[
        megatron_key
    ]


def _same(reader: SafetensorsReader, a: str, b: str) -> bool:
    """Whether two tensors are bitwise equal, compared in row blocks (never both whole in memory)."""
    if b not in reader:  # tied head: compare the MTP head copy against the embedding
        b = "model.embed_tokens.weight"
    ia, ib = reader.tensors[a], reader.tensors[b]
    if ia.shape != ib.shape or ia.dtype != ib.dtype:
        return False
    rows = ia.shape[0] if ia.shape else 1
    step = max(1, _COMPARE_BYTES // max(1, ia.nbytes // max(rows, 1)))
    for r in range(0, rows, step):
        span = (r, min(rows, r + step))
        if not torch.equal(reader.read(a, span).view(torch.uint8), reader.read(b, span).view(torch.uint8)):
            return False
    return True


def _chunks(slots: list[mn.Slot], source: _Source, cfg: ModelConfig) -> list[Chunk]:
    out = []
    for s in slots:
        shapes = [source.shape(n) for n in s.hf]
        fused = shapes[0] if s.fuse == "copy" else (sum(x[0] for x in shapes), *shapes[0][1:])
        unprefixed = (fused[0] * s.part[1], *fused[1:]) if fused else fused
        offsets, sizes = mn.chunk_box(s, unprefixed) if fused else ((), ())
        global_shape = tuple(c for _, c in s.prefix) + tuple(unprefixed)
        out.append(Chunk(s.key, global_shape, offsets, sizes, source.dtype_of(s.hf[0]), s))
    return out
