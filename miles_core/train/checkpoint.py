"""Trainer checkpoints: torch_dist in the megatron-core layout, plus optimizer, step, scheduler and RNG.

    OUT/
      latest_checkpointed_iteration.txt      written last: it is what makes a checkpoint count
      iter_0000007/                          one DCP checkpoint (written to a temporary name, renamed)
        .metadata, __0_*.distcp                model weights under megatron-core names (the same chunks
                                               `hf_to_torch_dist` writes), and Adam's moments under
                                               `optimizer.state.exp_avg.<key>` / `...exp_avg_sq.<key>`
                                               (megatron's param-space optimizer layout)
        metadata.json, common.pt               megatron's files; common.pt also holds `miles_train`:
                                               step, scheduler, optimizer param groups, RNG states
      config.json, miles_checkpoint.json

The names and layouts come from miles_core.checkpoint (megatron_names, torch_dist_io), so the
checkpoint reads back with `miles_core.checkpoint.load_torch_dist` / `torch_dist_to_hf` and with
megatron-core. Moments are mapped exactly like their parameters: each HF tensor is a view of a miles
parameter, and the same view (offset, sizes, strides) of the moment tensor is its moment. Values are
stored in their own dtype, so save + load is bit-exact.
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from torch import nn

from miles_core.checkpoint import megatron_names as mn
from miles_core.checkpoint.folders import INFO, MEGATRON_METADATA, TRACKER, iter_dir_name, resolve_iteration_dir
from miles_core.checkpoint.torch_dist_io import Chunk, TorchDistReader, write_chunks
from miles_core.errors import MilesError
from miles_core.io import atomic_dir
from miles_core.model import miles_to_hf

MOMENTS = ("exp_avg", "exp_avg_sq")


def is_torch_dist(path: str) -> bool:
    path = str(path)
    return os.path.exists(os.path.join(path, TRACKER)) or os.path.exists(os.path.join(path, ".metadata"))


def load_policy(
    path: str, device="cpu", dtype=torch.float32, mtp_num_layers: int | None = None, iteration: int | None = None
):
    """A miles model from an HF folder or a torch_dist checkpoint (its latest or given iteration)."""
    if is_torch_dist(path):
        from miles_core.checkpoint import load_torch_dist

        if mtp_num_layers:
            raise MilesError("--mtp-num-layers applies to HF checkpoints; convert torch_dist with it instead")
        return load_torch_dist(str(path), iteration, device=device, dtype=dtype)
    from miles_core.model import load_model

    return load_model(str(path), device, dtype, mtp_num_layers)


def latest_iteration(ckpt: str) -> int | None:
    tracker = os.path.join(str(ckpt), TRACKER)
    if not os.path.exists(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    return int(text) if text.isdigit() else None


# --- the HF view of a model: every HF tensor as a view of one parameter (or buffer) -------------------


class _Views:
    def __init__(self, model: nn.Module):
        self.cfg = model.config
        self.hf = dict(miles_to_hf(model))  # HF name -> view into a parameter / buffer
        by_storage = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
        self.owner = {n: by_storage.get(t.untyped_storage().data_ptr()) for n, t in self.hf.items()}
        self.num_mtp = len(model.mtp.layers) if getattr(model, "mtp", None) is not None else 0

    def moment(self, name: str, optimizer: torch.optim.Optimizer, kind: str) -> torch.Tensor | None:
        """The view of `kind` (exp_avg / exp_avg_sq) that sits where HF tensor `name` sits in its param."""
        p, v = self.owner[name], self.hf[name]
        state = optimizer.state.get(p) if p is not None else None
        if not state or kind not in state:
            return None
        m = state[kind]
        if m.shape != p.shape or m.stride() != p.stride():
            raise MilesError(f"optimizer state {kind} of {name} is not laid out like its parameter")
        return m.as_strided(v.size(), v.stride(), m.storage_offset() + v.storage_offset() - p.storage_offset())

    def slots(self) -> list[mn.Slot]:
        out = []
        for s in mn.model_slots(self.cfg, self.num_mtp, mn.is_stacked(self.cfg)):
            have = [n in self.hf for n in s.hf]
            if s.copy_of or (not all(have) and s.optional and not any(have)):
                continue  # MTP copies of the shared embedding / head are the main tensors here
            if not all(have):
                raise MilesError(f"model has no tensor {s.hf[have.index(False)]} for megatron key {s.key}")
            out.append(s)
        return out


def _chunk(view: _Views, s: mn.Slot, key: str, dtype: torch.dtype, ref) -> Chunk:
    shapes = [tuple(view.hf[n].shape) for n in s.hf]
    fused = shapes[0] if s.fuse == "copy" else (sum(x[0] for x in shapes), *shapes[0][1:])
    unprefixed = (fused[0] * s.part[1], *fused[1:])
    offsets, sizes = mn.chunk_box(s, unprefixed)
    return Chunk(key, tuple(c for _, c in s.prefix) + unprefixed, offsets, sizes, dtype, ref)


# --- save -----------------------------------------------------------------------------------------------


def save_checkpoint(
    out_dir: str,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    train_state: dict | None = None,
) -> str:
    """Write OUT/iter_XXXXXXX (atomically), then the tracker. Returns the iteration folder."""
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    view = _Views(model)
    slots = view.slots()
    chunks = [_chunk(view, s, s.key, view.hf[s.hf[0]].dtype, (s, None)) for s in slots]
    if optimizer is not None:
        for kind in MOMENTS:
            for s in slots:
                m = view.moment(s.hf[0], optimizer, kind)
                if m is not None:
                    chunks.append(_chunk(view, s, f"optimizer.state.{kind}.{s.key}", m.dtype, (s, kind)))

    def produce(c: Chunk) -> torch.Tensor:
        s, kind = c.ref
        parts = [view.hf[n] if kind is None else view.moment(n, optimizer, kind) for n in s.hf]
        return mn.fuse(s, parts, view.cfg).reshape(c.sizes).contiguous()

    objects = {k: [None] for k in mn.extra_state_keys(slots)}
    info = {"format": "torch_dist", "writer": "miles_core.train", "architecture": view.cfg.architecture,
            "layers": "stacked" if mn.is_stacked(view.cfg) else "per_layer", "mtp_num_layers": view.num_mtp,
            "optimizer_layout": "optimizer.state.{exp_avg,exp_avg_sq}.<megatron key>"}  # fmt: skip
    common = {"checkpoint_version": 3.0, "iteration": iteration, "miles": info,
              "miles_train": _train_state(model, optimizer, scheduler, train_state)}  # fmt: skip
    final = os.path.join(out_dir, iter_dir_name(iteration))
    with atomic_dir(final, overwrite=True) as tmp:
        write_chunks(tmp, chunks, produce, objects)
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(MEGATRON_METADATA, f)
        torch.save(common, os.path.join(tmp, "common.pt"))
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(view.cfg.raw, f, indent=2)
    with open(os.path.join(out_dir, INFO), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out_dir, TRACKER), "w") as f:  # last
        f.write(str(iteration))
    return final


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _train_state(model, optimizer, scheduler, extra: dict | None) -> dict:
    state = {"rng": _rng_state(), "extra": dict(extra or {})}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        sd = optimizer.state_dict()
        order = [p for g in optimizer.param_groups for p in g["params"]]
        state["optimizer"] = {
            "param_groups": sd["param_groups"],
            "param_names": [names[id(p)] for p in order],
            "steps": {i: s["step"] for i, s in sd["state"].items() if "step" in s},
        }
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


# --- load -----------------------------------------------------------------------------------------------


def read_train_state(ckpt: str, iteration: int | None = None) -> dict:
    """`miles_train` of common.pt ({} for a checkpoint written by the converter)."""
    d = resolve_iteration_dir(str(ckpt), iteration)
    path = os.path.join(d, "common.pt")
    if not os.path.exists(path):
        return {}
    return torch.load(path, map_location="cpu", weights_only=False).get("miles_train", {})


def load_checkpoint(
    ckpt: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    iteration: int | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load weights (in place), optimizer moments and steps, scheduler and RNG; returns `extra`."""
    d = resolve_iteration_dir(str(ckpt), iteration)
    reader = TorchDistReader(d)
    view = _Views(model)
    slots = [s for s in view.slots() if mn.resolve_key(s.key, reader.tensors)]
    missing = [s.key for s in view.slots() if not s.optional and s not in slots]
    if missing:
        raise MilesError(f"{d} lacks tensor {missing[0]}; was it written for this model?")
    state = read_train_state(ckpt, iteration)
    with torch.no_grad():
        _read_into(reader, view, slots, None, lambda n: view.hf[n])
        if optimizer is not None and "optimizer" in state:
            _load_optimizer(optimizer, model, state["optimizer"])
            for kind in MOMENTS:
                dest = lambda n, k=kind: view.moment(n, optimizer, k)
                _read_into(reader, view, slots, f"optimizer.state.{kind}.", dest)
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        _set_rng(state["rng"])
    return state.get("extra", {})


def _read_into(reader: TorchDistReader, view: _Views, slots, prefix: str | None, dest) -> None:
    regions, targets = [], []
    for s in slots:
        key = mn.resolve_key(s.key, reader.tensors) if prefix is None else prefix + s.key
        if key not in reader.tensors:
            continue
        shape = reader.shape(key)
        offsets, sizes = mn.chunk_box(s, shape[len(s.prefix) :])
        regions.append((key, offsets, sizes))
        targets.append((s, tuple(sizes[len(s.prefix) :])))
    for (s, chunk_shape), t in zip(targets, reader.read(regions), strict=True):
        for name, part in zip(s.hf, mn.split(s, t.reshape(chunk_shape), view.cfg), strict=True):
            out = dest(name)
            if out is None:
                continue
            if out.shape != part.shape:
                raise MilesError(f"checkpoint has {name} as {tuple(part.shape)}, the model {tuple(out.shape)}")
            out.copy_(part)


def _load_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict) -> None:
    """Rebuild Adam's state (steps, zero moments: filled from the checkpoint next) via load_state_dict."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    if [names[id(p)] for p in order] != saved["param_names"]:
        raise MilesError("optimizer in the checkpoint trains other parameters (is freeze_router / MTP the same?)")
    state = {
        i: {"step": step, "exp_avg": torch.zeros_like(order[i]), "exp_avg_sq": torch.zeros_like(order[i])}
        for i, step in saved["steps"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
