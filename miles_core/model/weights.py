"""HF on-disk tensor names <-> miles parameters.

On disk (as transformers writes them) experts are per expert:
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight   [I, H]
    model.layers.{i}.mlp.experts.{e}.up_proj.weight     [I, H]
    model.layers.{i}.mlp.experts.{e}.down_proj.weight   [H, I]
In miles they are stacked: experts.gate_up_proj [E, 2I, H] (gate rows, then up) and
experts.down_proj [E, H, I]. DeepSeek-V3's MTP layer j sits on disk at model.layers.{L + j}.*, in
miles at mtp.layers.{j}.*; its embed_tokens / shared_head.head copies are the shared main ones.
Every other name is the same on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Tensors some checkpoints carry that hold nothing to load.
IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: parameter `name`, optionally index `expert` and row `rows` slice."""

    name: str
    expert: int | None = None
    part: str | None = None  # "gate" | "up" | "down" for experts


def hf_to_miles(hf_name: str, num_layers: int, num_mtp: int) -> Target | None:
    """Map one on-disk HF name to its miles target; None for tensors that are not loaded."""
    if IGNORED.search(hf_name):
        return None
    m = _LAYER.match(hf_name)
    if m and int(m.group(1)) >= num_layers:
        j, rest = int(m.group(1)) - num_layers, m.group(2)
        if j >= num_mtp or rest in MTP_SHARED:
            return None
        if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            return Target(f"mtp.layers.{j}.{rest}")
        if rest == "shared_head.norm.weight":
            return Target(f"mtp.layers.{j}.final_norm.weight")
        hf_name = f"mtp.layers.{j}.layer.{rest}"
    e = _EXPERT.match(hf_name)
    if e:
        prefix, idx, proj = e.group(1), int(e.group(2)), e.group(3)
        stacked = "down_proj" if proj == "down_proj" else "gate_up_proj"
        return Target(f"{prefix}.{stacked}", idx, proj.split("_")[0])
    return Target(hf_name)


def miles_to_hf(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF on-disk name, tensor) for every weight of `model`, experts unstacked (views, no copies)."""
    cfg = model.config
    tied = cfg.tie_word_embeddings
    for name, t in _named_tensors(model):
        if tied and name == "lm_head.weight":
            continue
        if name.startswith("mtp.layers."):
            yield from _mtp_to_hf(model, name, t)
            continue
        yield from _unstack(name, t)


def _named_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen or name == "lm_head.weight":
            seen.add(id(p))
            yield name, p.detach()
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            yield name, b


def _unstack(name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if name.endswith(".experts.gate_up_proj"):
        prefix, inter = name[: -len(".gate_up_proj")], t.shape[1] // 2
        for e in range(t.shape[0]):
            yield f"{prefix}.{e}.gate_proj.weight", t[e, :inter]
            yield f"{prefix}.{e}.up_proj.weight", t[e, inter:]
    elif name.endswith(".experts.down_proj"):
        prefix = name[: -len(".down_proj")]
        for e in range(t.shape[0]):
            yield f"{prefix}.{e}.down_proj.weight", t[e]
    else:
        yield name, t


def _mtp_to_hf(model, name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    _, _, j, rest = name.split(".", 3)
    layer = f"model.layers.{model.config.num_hidden_layers + int(j)}"
    if rest.startswith("layer."):
        for n, x in _unstack(rest[len("layer.") :], t):
            yield f"{layer}.{n}", x
    elif rest == "final_norm.weight":
        yield f"{layer}.shared_head.norm.weight", t
        # DeepSeek-V3 checkpoints carry copies of the shared embedding and head in each MTP layer.
        yield f"{layer}.embed_tokens.weight", model.model.embed_tokens.weight.detach()
        yield f"{layer}.shared_head.head.weight", model.lm_head.weight.detach()
    else:
        yield f"{layer}.{rest}", t


def count_mtp_layers(hf_names, num_layers: int) -> int:
    """How many MTP layers a checkpoint holds: distinct layer ids >= num_layers with an eh_proj."""
    ids = set()
    for n in hf_names:
        m = _LAYER.match(n)
        if m and int(m.group(1)) >= num_layers and m.group(2) == "eh_proj.weight":
            ids.add(int(m.group(1)))
    return len(ids)
