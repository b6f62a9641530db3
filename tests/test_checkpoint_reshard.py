"""Resharding: a torch_dist checkpoint saved by 1 process loads on 2 CPU ranks (gloo, loopback), and one
saved by 2 ranks loads in 1 process, with the same tensors bit for bit.

The 2 ranks load through torch.distributed.checkpoint's own distributed path (each rank asks for its
row half of every tensor as a DTensor, as an FSDP/TP trainer would), and through miles' region reader
(each rank reads its half of the experts, as expert parallelism would).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from miles_core.checkpoint import hf_to_torch_dist, torch_dist_to_hf
from miles_core.checkpoint.torch_dist_io import TorchDistReader
from tests.tiny_models import CONFIGS, save_hf

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, src: str, dst: str, result_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        reader = TorchDistReader(src)
        # 1 -> 2: every tensor as a row-sharded DTensor, filled by DCP's distributed load
        state = {
            k: distribute_tensor(torch.zeros(reader.shape(k), dtype=reader.dtype(k)), mesh, [Shard(0)])
            for k in reader.tensors
        }
        dcp.load(state, checkpoint_id=src)
        checked = 0
        for k, dt in state.items():
            full = reader.read_full(k)  # what a single process reads
            rows = full.shape[0]
            lo = (rows + WORLD - 1) // WORLD * rank
            hi = min(rows, lo + (rows + WORLD - 1) // WORLD)
            assert torch.equal(dt.to_local(), full[lo:hi]), k
            checked += 1
        # expert parallel: this rank's half of the experts through miles' region reader
        key = next((k for k in reader.tensors if k.endswith("experts.experts.linear_fc1.weight")), None)
        if key is None:  # dense model: split the layers instead
            key = "decoder.layers.mlp.linear_fc1.weight"
        shape = reader.shape(key)
        e_axis = len(shape) - 3 if "experts" in key else 0
        half = shape[e_axis] // WORLD
        offsets = [0] * len(shape)
        offsets[e_axis] = rank * half
        sizes = list(shape)
        sizes[e_axis] = half
        (mine,) = reader.read([(key, tuple(offsets), tuple(sizes))])
        assert torch.equal(mine, reader.read_full(key).narrow(e_axis, rank * half, half))
        # 2 -> 1: save the sharded state from both ranks; the parent reads it back in one process
        dcp.save(state, checkpoint_id=dst)
        with open(os.path.join(result_dir, f"rank{rank}.ok"), "w") as f:
            f.write(str(checked))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "name",
    # qwen3_moe: per-layer keys (mixed dense/MoE); the others: DeepSeek MLA + MTP, stacked dense layers
    ["qwen3_moe", pytest.param("deepseek_v3", marks=pytest.mark.slow), pytest.param("qwen3", marks=pytest.mark.slow)],
)
def test_saved_by_one_process_loads_on_two_ranks_and_back(name, tmp_path):
    cfg = CONFIGS[name]()
    hf, _ = save_hf(cfg, str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    src = os.path.join(ckpt, "iter_0000000")
    two = tmp_path / "td2"
    (two / "iter_0000000").mkdir(parents=True)
    mp.spawn(_rank_main, args=(_free_port(), src, str(two / "iter_0000000"), str(tmp_path)), nprocs=WORLD)
    counts = {int((tmp_path / f"rank{r}.ok").read_text()) for r in range(WORLD)}
    assert counts == {len(TorchDistReader(src).tensors)}
    # the 2-rank checkpoint really is sharded: tensors in chunks from both ranks
    md = TorchDistReader(str(two / "iter_0000000")).metadata
    assert len(glob.glob(str(two / "iter_0000000" / "*.distcp"))) == WORLD
    assert max(len(v.chunks) for v in TorchDistReader(str(two / "iter_0000000")).tensors.values()) >= WORLD
    assert md is not None
    shutil.copy(os.path.join(ckpt, "config.json"), two / "config.json")
    (two / "latest_checkpointed_iteration.txt").write_text("0")
    back = torch_dist_to_hf(str(two), str(tmp_path / "back"))
    a = load_file(os.path.join(hf, "model.safetensors"))
    b = {}
    for f in glob.glob(os.path.join(back, "*.safetensors")):
        b.update(load_file(f))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
