"""Static-shape decode, replayed from CUDA graphs on the GPU.

The static-shape logic runs in the CPU tests (`capture=False`); capture and replay in the `gpu`
tests and bench/rollout.py (bench/RESULTS.md, "Rollout decode").

A decode step launches hundreds of small kernels (per layer: norms, projections, rope, cache
writes, attention, router, grouped experts); at batch 64 each is a few microseconds, so Python and
launch overhead, not memory bandwidth, set the step time. A CUDA graph replays the whole step as
one launch. It needs fixed shapes and fixed tensor addresses, so the step here always runs
*every* slot (row i = slot i; free slots decode a dummy token at position 0 of their own, unused
row), reads its inputs from persistent buffers, and attends over a length rounded up to a bucket
(`bucket`, e.g. 256): one graph per bucket, captured the first time that length is reached, or all
up front (`capture_all`, `Engine.warmup`).
The MoE block runs without a host sync; the experts run grouped GEMMs that take their per-expert row
counts on the device (the Triton kernels at decode sizes, else `torch._grouped_mm`). Models whose
experts cannot (fp32 experts, INT4 experts on fp32 activations) are refused up front
(`capture_blocker`, checked by the engine). Sampling stays outside the graph.
`advance` turns a step's sampled tokens into the next step's inputs on the device, so the engine
can queue the next step before the tokens reach the host (`Engine._decode_ahead`).

Weights updated in place (`copy_`, see weights.py) keep their addresses, so graphs stay valid
across weight updates; `reset()` drops them (needed only if a module's tensors were replaced).
"""

from __future__ import annotations

import torch

from miles_core.rollout.cache import KVCache
from miles_core.rollout.runner import StepBatch, forward_step
from miles_core.rollout.sampling import device_tensor

__all__ = ["GraphDecoder", "capture_blocker"]

_16BIT = (torch.bfloat16, torch.float16)


def capture_blocker(model) -> str | None:
    """Why a CUDA graph cannot capture this model's decode step, or None when it can.

    The experts' GEMMs must run a kernel that takes its per-expert row counts on the device: bf16 /
    fp16 experts (the Triton grouped kernel or `torch._grouped_mm`), INT4 experts on bf16 activations
    (the W4A16 kernel) and FP8 experts on any. Otherwise they fall back to a loop over the experts that
    reads the counts on the host, which a capture cannot do (it fails mid-capture)."""
    dtype = model.model.embed_tokens.weight.dtype  # the activations' dtype
    for i, layer in enumerate(model.model.layers):
        if not layer.is_moe:
            continue
        fmt = getattr(layer.mlp.experts, "fmt", None)  # QuantExperts: "fp8" / "int4"; bf16 Experts: None
        if fmt == "int4" and dtype != torch.bfloat16:
            return f"layer {i}: INT4 experts run their kernel on bf16 activations only, this model runs {dtype}"
        if fmt is None and layer.mlp.experts.gate_up_proj.dtype not in _16BIT:
            return f"layer {i}: {layer.mlp.experts.gate_up_proj.dtype} experts have no device-side grouped GEMM"
    return None


class GraphDecoder:
    def __init__(self, model, cache: KVCache, bucket: int = 256, capture: bool | None = None):
        self.model, self.cache, self.bucket = model, cache, bucket
        device = cache.a[0].device
        self.capture = device.type == "cuda" if capture is None else capture
        s = cache.slots
        self.inputs = torch.zeros(2, s, dtype=torch.long, device=device)  # last token, position per slot
        self.tokens = self.inputs[0].view(s, 1)  # [S, 1]
        self.start = self.inputs[1]  # [S]
        self.slots = torch.arange(s, device=device)
        self.n_valid = torch.ones(s, dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def _length(self, need: int) -> int:
        return min(-(-need // self.bucket) * self.bucket, self.cache.max_len)

    def _batch(self, read_len: int) -> StepBatch:
        return StepBatch(self.tokens, self.slots, self.start, self.n_valid, read_len, all_slots=True)

    def upload(self, rows: list[tuple[list[int], int, int]]) -> None:
        """rows: ([last token], slot, position) of each running sample; free slots get token 0 at 0."""
        s = self.cache.slots
        tokens, start = [0] * s, [0] * s
        for ids, slot, pos in rows:
            tokens[slot], start[slot] = ids[0], pos
        host = torch.tensor([tokens, start], dtype=torch.long)
        if self.inputs.is_cuda:  # pinned: the copy is queued without a stream sync
            host = host.pin_memory()
        self.inputs.copy_(host, non_blocking=True)

    def run(self, need: int) -> torch.Tensor:
        """One step over every slot from the current inputs, attending `need` positions (rounded up
        to the bucket) -> logits [S, V] in slot order (a graph's output buffer: read before the next run)."""
        length = self._length(need)
        if not self.capture:
            return forward_step(self.model, self.cache, self._batch(length), capture_safe=True)
        if length not in self._graphs:
            self._graphs[length] = self._capture(length)
        graph, logits = self._graphs[length]
        graph.replay()
        return logits

    def capture_all(self, up_to: int | None = None) -> int:
        """Capture now the graph of every bucket up to `up_to` attended positions (default: the
        cache's max_len) instead of at the first step that reaches each; returns how many are new.
        Each capture runs the step eagerly three times (two warm-ups and the capture), which costs
        tens of ms per bucket on the host, so an engine that lives across rounds pays it once here.
        The captures decode token 0 at position 0 of every slot: only while no sample is running."""
        if not self.capture:
            return 0
        up_to = up_to or self.cache.max_len
        self.upload([])
        lengths = {self._length(n) for n in range(1, up_to + 1, self.bucket)} | {self._length(up_to)}
        new = sorted(n for n in lengths if n not in self._graphs)
        for n in new:
            self._graphs[n] = self._capture(n)
        return len(new)

    def advance(self, tokens: torch.Tensor) -> None:
        """Next step's inputs on the device: each slot feeds its sampled token [S] one position on
        (free slots too, clamped inside the slot: their rows are never read)."""
        self.tokens.copy_(tokens[:, None])
        self.start.add_(1).clamp_(max=self.cache.max_len - 1)

    def decode(self, rows: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """rows: ([last token], slot, position) of each running sample -> logits [N, V] in row order."""
        self.upload(rows)
        logits = self.run(max(pos for _, _, pos in rows) + 1)
        which = [slot for _, slot, _ in rows]
        if which == list(range(self.cache.slots)):  # every slot running, in slot order: no gather
            return logits
        return logits[device_tensor(which, torch.long, self.inputs.device)]

    def _capture(self, length: int):
        """Warm up on a side stream, then capture. The inputs are this step's real ones and the step
        is idempotent (it rewrites the same KV at the same positions), so warm-up runs are harmless."""
        batch = self._batch(length)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward_step(self.model, self.cache, batch, capture_safe=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward_step(self.model, self.cache, batch, capture_safe=True)
        self._pool = graph.pool()
        return graph, logits

    def reset(self) -> None:
        self._graphs.clear()
