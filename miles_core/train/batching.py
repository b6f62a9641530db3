"""Rollout rows -> right-padded micro-batches under a token budget, every tensor aligned to positions.

A sample of n = P + R tokens (prompt then response) is fed as its first n - 1 tokens; position t
predicts token t + 1. So with `input_ids = tokens[:-1]` and `targets = tokens[1:]`:
  - the response tokens are targets P - 1 .. n - 2 (`loss_mask`),
  - `rollout_logprobs[j]` (response token j) sits at position P - 1 + j,
  - `routed_experts` from the Parquet has exactly n - 1 rows, one per input position (the engine
    never runs the last token), so it lines up with `input_ids` as it is.
Micro-batches are filled greedily over samples sorted by length (longest first, stable), so that
padding stays small, with rows * longest row <= `token_budget`; one sample longer than the budget
gets a micro-batch of its own. The model has no block-diagonal (varlen) attention mask, so rows are
padded, not concatenated. The split is deterministic: it depends on lengths and order only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from miles_core.errors import MilesError


@dataclass
class Sample:
    """One rollout row as tensors."""

    tokens: Tensor  # [n] int64, prompt + response
    prompt_len: int
    rollout_logprobs: Tensor  # [R] float32
    reward: float
    group: str  # prompt_id: the GRPO group
    routed_experts: Tensor | None = None  # [n - 1, moe_layers, k] int16, or None (dense / not recorded)
    weight_version: int = 0  # the oldest version among its tokens
    token_versions: Tensor | None = None  # [R] int64, per response token (partial rollout), or None
    iteration: int = 0
    status: str = "completed"
    advantage: float = 0.0
    metadata: dict = field(default_factory=dict)

    @property
    def response_len(self) -> int:
        return int(self.tokens.numel()) - self.prompt_len


@dataclass
class MicroBatch:
    """Right-padded tensors for one forward/backward; B rows, T = longest sample - 1."""

    input_ids: Tensor  # [B, T] int64, 0 on padding
    targets: Tensor  # [B, T] int64, the next token; 0 on padding
    attention_mask: Tensor  # [B, T] bool, real input positions
    loss_mask: Tensor  # [B, T] bool, positions whose target is a response token
    rollout_logprobs: Tensor  # [B, T] float32, 0 off the loss mask
    advantages: Tensor  # [B] float32
    rewards: Tensor  # [B] float32
    weight_version: Tensor  # [B, T] int64, the version that generated each target (per sample if unknown)
    routed_experts: Tensor | None  # [B, T, moe_layers, k] int64 (padding: experts 0..k-1), or None
    index: Tensor  # [B] int64, each row's sample index in the batch

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device) -> MicroBatch:
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def samples_from_table(table) -> list[Sample]:
    """Rollout Parquet rows (a pyarrow Table from `read_rollouts`) -> samples, in row order.

    List columns are read through Arrow's flat buffers (one numpy array each, split by offsets), not
    as Python lists: routed experts are tokens x layers x k small ints per row, millions per batch.
    """
    n = table.num_rows
    prompts, responses = _lists(table, "prompt_tokens", np.int64), _lists(table, "response_tokens", np.int64)
    logprobs = _lists(table, "rollout_logprobs", np.float32)
    versions = _lists(table, "logprob_versions", np.int64) if "logprob_versions" in table.column_names else None
    experts = _experts(table.column("routed_experts"))
    cols = table.select(["reward", "prompt_id", "weight_version", "iteration", "status", "metadata"]).to_pydict()
    out = []
    for i in range(n):
        if responses[i].size == 0:
            continue  # nothing to train on (e.g. an aborted sample with no tokens yet)
        out.append(
            Sample(
                tokens=torch.from_numpy(np.concatenate([prompts[i], responses[i]])),
                prompt_len=int(prompts[i].size),
                rollout_logprobs=torch.from_numpy(logprobs[i]),
                reward=float(cols["reward"][i]),
                group=str(cols["prompt_id"][i]),
                routed_experts=None if experts[i] is None else torch.from_numpy(experts[i]),
                weight_version=int(cols["weight_version"][i]),
                token_versions=None if versions is None else torch.from_numpy(versions[i]),
                iteration=int(cols["iteration"][i]),
                status=str(cols["status"][i]),
                metadata=json.loads(cols["metadata"][i] or "{}"),
            )
        )
    return out


def _lists(table, name: str, dtype) -> list[np.ndarray]:
    """A list<number> column -> one numpy array per row (views into one flat copy)."""
    import pyarrow.compute as pc

    col = table.column(name)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    return np.split(flat.copy(), np.cumsum(lengths)[:-1]) if len(lengths) else []


def _experts(col) -> list[np.ndarray | None]:
    """routed_experts list<list<list<int>>> -> per row int16 [T, L, k] (or None for a null row)."""
    import pyarrow.compute as pc

    rows = pc.list_value_length(col).to_numpy(zero_copy_only=False)  # [N] T per row (null -> NaN / 0)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    positions = pc.list_flatten(col)  # list<list<int>>, one per position of the valid rows
    if len(positions) == 0:
        return [None if not v else np.zeros((0, 0, 0), np.int16) for v in valid]
    layers = pc.list_flatten(positions)  # list<int>, one per (position, layer)
    flat = pc.list_flatten(layers).to_numpy(zero_copy_only=False).astype(np.int16, copy=False)
    n_layers = int(pc.list_value_length(positions)[0].as_py())
    k = int(pc.list_value_length(layers)[0].as_py())
    if flat.size != len(positions) * n_layers * k:
        raise MilesError("routed_experts rows must all have the same number of MoE layers and top-k")
    grid = flat.reshape(-1, n_layers, k)  # [sum T, L, k]
    lengths = np.where(valid, np.nan_to_num(rows.astype(np.float64)), 0).astype(np.int64)
    parts = np.split(grid.copy(), np.cumsum(lengths)[:-1])
    return [p if v else None for p, v in zip(parts, valid, strict=True)]


def samples_from_tokens(
    prompts: list, responses: list, rewards: list | None = None, logprobs: list | None = None
) -> list[Sample]:
    """Samples from token lists (SFT data, tests); rollout log-probs default to 0."""
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        p, r = torch.as_tensor(p, dtype=torch.int64), torch.as_tensor(r, dtype=torch.int64)
        lp = torch.zeros(r.numel()) if logprobs is None else torch.as_tensor(logprobs[i], dtype=torch.float32)
        out.append(Sample(torch.cat([p, r]), p.numel(), lp, 0.0 if rewards is None else float(rewards[i]), str(i)))
    return out


def plan_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Greedy split of sample indices, longest first, with rows * (longest length) <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep row order
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def collate(samples: list[Sample], index: list[int], num_moe_layers: int = 0, top_k: int = 0) -> MicroBatch:
    """Right-pad the chosen samples into one micro-batch (see the module doc for the alignment)."""
    rows = [samples[i] for i in index]
    b, t = len(rows), max(s.tokens.numel() for s in rows) - 1
    if t < 1:
        raise MilesError("a sample needs at least two tokens (a prompt token and a response token)")
    input_ids = torch.zeros(b, t, dtype=torch.int64)
    targets = torch.zeros(b, t, dtype=torch.int64)
    attn = torch.zeros(b, t, dtype=torch.bool)
    loss_mask = torch.zeros(b, t, dtype=torch.bool)
    rollout = torch.zeros(b, t, dtype=torch.float32)
    versions = torch.zeros(b, t, dtype=torch.int64)
    have_experts = all(s.routed_experts is not None for s in rows) and num_moe_layers > 0
    experts = torch.arange(top_k).expand(b, t, num_moe_layers, top_k).clone() if have_experts else None
    for r, s in enumerate(rows):
        n, p = s.tokens.numel(), s.prompt_len
        if p < 1:
            raise MilesError(f"sample {index[r]} (prompt {s.group}) has an empty prompt")
        input_ids[r, : n - 1] = s.tokens[:-1]
        targets[r, : n - 1] = s.tokens[1:]
        attn[r, : n - 1] = True
        loss_mask[r, p - 1 : n - 1] = True
        if s.rollout_logprobs.numel() != n - p:
            raise MilesError(f"sample {index[r]}: {s.rollout_logprobs.numel()} rollout log-probs for {n - p} tokens")
        rollout[r, p - 1 : n - 1] = s.rollout_logprobs
        versions[r] = s.weight_version
        if s.token_versions is not None and s.token_versions.numel() == n - p:
            versions[r, p - 1 : n - 1] = s.token_versions
        if experts is not None:
            rec = s.routed_experts  # [n - 1, L, k]
            if tuple(rec.shape) != (n - 1, num_moe_layers, top_k):
                raise MilesError(
                    f"sample {index[r]}: routed_experts has shape {tuple(rec.shape)}, "
                    f"expected {(n - 1, num_moe_layers, top_k)} [positions, moe_layers, topk]"
                )
            experts[r, : n - 1] = rec.to(torch.int64)
    return MicroBatch(
        input_ids=input_ids,
        targets=targets,
        attention_mask=attn,
        loss_mask=loss_mask,
        rollout_logprobs=rollout,
        advantages=torch.tensor([s.advantage for s in rows], dtype=torch.float32),
        rewards=torch.tensor([s.reward for s in rows], dtype=torch.float32),
        weight_version=versions,
        routed_experts=experts,
        index=torch.tensor(index, dtype=torch.int64),
    )


def make_micro_batches(
    samples: list[Sample], token_budget: int, num_moe_layers: int = 0, top_k: int = 0
) -> list[MicroBatch]:
    """Pack `samples` into micro-batches of at most `token_budget` padded tokens each."""
    lengths = [s.tokens.numel() - 1 for s in samples]
    return [collate(samples, g, num_moe_layers, top_k) for g in plan_micro_batches(lengths, token_budget)]


def split_minibatches(samples: list[Sample], n: int, generator: torch.Generator | None = None) -> list[list[Sample]]:
    """Split into n mini-batches (one optimizer step each) by whole GRPO groups, optionally shuffled."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    keys = list(groups)
    if generator is not None:
        keys = [keys[i] for i in torch.randperm(len(keys), generator=generator).tolist()]
    n = max(1, min(n, len(keys)))
    parts = [keys[i::n] for i in range(n)] if generator is not None else _contiguous(keys, n)
    return [[s for k in part for s in groups[k]] for part in parts]


def _contiguous(keys: list[str], n: int) -> list[list[str]]:
    size, extra = divmod(len(keys), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(keys[start:end])
        start = end
    return out
