"""Stream chunks into and out of a `torch.distributed.checkpoint` (DCP) folder, one chunk at a time.

Writing: a DCP save whose plan is made of chunk descriptions only (key, global shape, offsets,
sizes, dtype). DCP asks the planner for each chunk's data just before writing it
(`resolve_data`), so the planner produces it lazily from the source and the model is never in
memory. The stock writer keeps the last tensor of every key written to the current file alive until
that file is closed, so files are cut at `max_file_bytes`; that bounds the memory held.

Reading: any region of any key, whatever chunks it was saved in (1 rank or 1024), through DCP's own
resharding (`create_read_items_for_chunk_list`) and file reader. This is also what a Megatron
trainer does on load, so what reads back here reads back there.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from miles_core.errors import MilesError


class Chunk:
    """One chunk to write: `key`'s region [offsets, offsets + sizes) of a `global_shape` tensor."""

    __slots__ = ("key", "global_shape", "offsets", "sizes", "dtype", "ref")

    def __init__(self, key, global_shape, offsets, sizes, dtype, ref=None):
        self.key, self.global_shape, self.offsets, self.sizes = key, global_shape, offsets, sizes
        self.dtype, self.ref = dtype, ref

    @property
    def nbytes(self) -> int:
        n = torch.Size(self.sizes).numel()
        return n * torch.empty((), dtype=self.dtype).element_size()


class _LazySavePlanner(DefaultSavePlanner):
    """A save plan of described chunks; each chunk's tensor is made by `produce(chunk)` when written."""

    def __init__(self, chunks: list[Chunk], objects: dict[str, object], produce: Callable, on_item=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offsets)): c for c in chunks}
        self._order = chunks
        self._objects = objects
        self._produce = produce
        self._on_item = on_item

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in self._objects]
        for c in self._order:
            items.append(
                WriteItem(
                    index=MetadataIndex(c.key, torch.Size(c.offsets)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                        properties=TensorProperties(dtype=c.dtype),
                        size=torch.Size(c.global_shape),
                    ),
                )
            )
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save(self._objects[write_item.index.fqn], buf)
            return buf
        c = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = self._produce(c)
        if tuple(t.shape) != tuple(c.sizes) or t.dtype != c.dtype:
            raise RuntimeError(
                f"chunk {c.key}{list(c.offsets)}: made {t.dtype}{list(t.shape)}, planned {c.dtype}{list(c.sizes)}"
            )
        if self._on_item is not None:
            self._on_item(c)
        return t.contiguous()


class _BoundedFileWriter(FileSystemWriter):
    """FileSystemWriter that starts a new file every `max_file_bytes`, in plan order."""

    def __init__(self, path: str, max_file_bytes: int):
        super().__init__(path, single_file_per_rank=True, thread_count=1)
        self.max_file_bytes = max_file_bytes

    def write_data(self, plan, planner):
        import queue

        prefix = plan.storage_data.prefix
        file_queue: queue.Queue = queue.Queue()
        bucket, size = [], 0
        for item in plan.items:
            nb = (
                0
                if item.tensor_data is None
                else (
                    item.tensor_data.chunk.sizes.numel()
                    * torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()
                )
            )
            if bucket and size + nb > self.max_file_bytes:
                self._enqueue(file_queue, prefix, bucket)
                bucket, size = [], 0
            bucket.append(item)
            size += nb
        if bucket:
            self._enqueue(file_queue, prefix, bucket)
        return self._write_data(planner, file_queue)

    def _enqueue(self, file_queue, prefix, bucket):
        name = f"{prefix}{file_queue.qsize()}.distcp"
        file_queue.put((self.fs.concat_path(self.path, name), name, bucket))


def write_chunks(
    path: str,
    chunks: list[Chunk],
    produce: Callable[[Chunk], torch.Tensor],
    objects: dict[str, object] | None = None,
    max_file_bytes: int = 256 * 2**20,
    on_item: Callable[[Chunk], None] | None = None,
) -> None:
    """Write a DCP checkpoint at `path` from chunk descriptions; `objects` become BYTE_IO entries."""
    planner = _LazySavePlanner(chunks, objects or {}, produce, on_item)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({}, storage_writer=_BoundedFileWriter(path, max_file_bytes), planner=planner, no_dist=True)


class _RegionPlanner(LoadPlanner):
    """Copies read items into caller-owned destination tensors (keyed by fqn and chunk index)."""

    def __init__(self, dests: dict[tuple[str, int], torch.Tensor]):
        self.dests = dests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        pass

    def create_local_plan(self):
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise NotImplementedError

    def resolve_tensor(self, read_item):
        t = self.dests[(read_item.dest_index.fqn, read_item.dest_index.index)]
        for dim, (off, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            t = t.narrow(dim, off, length)
        return t

    def commit_tensor(self, read_item, tensor):
        pass


class TorchDistReader:
    """Regions of the tensors of one DCP folder (an `iter_XXXXXXX/` directory)."""

    def __init__(self, path: str):
        self.path = path
        self._reader = FileSystemReader(path)
        try:
            self.metadata = self._reader.read_metadata()
        except FileNotFoundError:
            raise MilesError(f"{path} is not a torch_dist checkpoint: no .metadata file") from None
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, regions: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> list[torch.Tensor]:
        """Read each (key, offsets, sizes) region into a fresh tensor, in one pass over the files."""
        dests, items = {}, []
        by_key: dict[str, list[int]] = {}
        for i, (key, _, _) in enumerate(regions):
            by_key.setdefault(key, []).append(i)
        out: list[torch.Tensor] = [None] * len(regions)  # type: ignore[list-item]
        for key, idxs in by_key.items():
            local = []
            for j, i in enumerate(idxs):
                _, offsets, sizes = regions[i]
                out[i] = torch.empty(sizes, dtype=self.dtype(key))
                dests[(key, j)] = out[i]
                local.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            items += create_read_items_for_chunk_list(key, self.tensors[key], local)
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        plan = self._reader.prepare_local_plan(LoadPlan(items))
        (plan,) = self._reader.prepare_global_plan([plan])
        self._reader.read_data(plan, _RegionPlanner(dests)).wait()
        return out

    def read_full(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self.read([(key, (0,) * len(shape), shape)])[0]
