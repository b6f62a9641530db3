"""Streaming safetensors: read one tensor at a time, write size-bounded shards tensor by tensor.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a conversion touches
stays in the process's resident set until the file is closed, so converting a 1 TB checkpoint would
show ~1 TB of RSS (page cache, but counted). Here the header is parsed once and each tensor is read
with a positioned read into its own buffer, which is freed as soon as the tensor is written out.
The writer knows every shape and dtype up front (from the source's metadata), so it writes each
shard's header first and then streams the tensors into it; a shard is never held in memory.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}`, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from miles_core.errors import MilesError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header; a file shorter than its header says is an error."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MilesError(f"{path} is truncated or not a safetensors file (size {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise MilesError(f"{path} is truncated or not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MilesError(f"{path} is not a safetensors file: its header is not JSON") from None
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise MilesError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        a, b = h["data_offsets"]
        out[name] = TensorInfo(path, DTYPES[h["dtype"]], tuple(h["shape"]), 8 + n + a, b - a)
        end = max(end, b)
    if 8 + n + end > size:
        raise MilesError(
            f"{path} is truncated: its header needs {8 + n + end} bytes but the file has {size}; "
            "re-download or re-save this shard"
        )
    return out


class SafetensorsReader:
    """All tensors of a folder of safetensors shards (with or without an index), read one at a time."""

    def __init__(self, folder: str):
        index = os.path.join(folder, INDEX_NAME)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise MilesError(f"{folder} has no *.safetensors files; is it an HF checkpoint folder?")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise MilesError(f"{index} lists {name}, which is missing from {folder}")
            self.tensors.update(read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor (or rows [a, b) of its first dim) in a fresh buffer; nothing stays mapped."""
        info = self.tensors[name]
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if rows is not None:
            row_bytes = nbytes // max(shape[0], 1)
            a, b = rows
            shape, start, nbytes = (b - a, *shape[1:]), start + a * row_bytes, (b - a) * row_bytes
        buf = bytearray(nbytes)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(start)
            got = f.readinto(buf)
        if got != nbytes:
            raise MilesError(f"{info.file} is truncated: could not read tensor {name}")
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).view(shape)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split (name, dtype, shape) in order into shards of at most `max_shard_bytes` (one tensor may exceed)."""
    shards, cur, size = [], [], 0
    for spec in specs:
        nb = _nbytes(spec[1], spec[2])
        if cur and size + nb > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += nb
    if cur:
        shards.append(cur)
    return shards


def write_shards(
    folder: str,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = 2 * 2**30,
    on_tensor=None,
) -> list[str]:
    """Stream `tensors` (in the order of `specs`) into HF shards + index under `folder`; returns file names.

    `specs` fixes names, dtypes and shapes beforehand so each shard's header is written first.
    """
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    it: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards, strict=True):
        header, off = {}, 0
        for name, dtype, shape in shard:
            nb = _nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        total += off
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        with open(os.path.join(folder, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, dtype, shape in shard:
                got_name, t = next(it)
                if got_name != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"writer expected {name} {dtype} {shape}, got {got_name} {t.dtype} {t.shape}")
                if t.numel():
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                if on_tensor is not None:
                    on_tensor(name)
            f.flush()
            os.fsync(f.fileno())
    if n > 1:
        with open(os.path.join(folder, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
