"""The slot-based KV cache: a fixed number of sequence slots, each `max_len` positions long.

A slot holds one sample for its whole life, so there is no block table to walk and every tensor
has a static shape (what a CUDA graph of the decode step needs). What a layer stores:

- GQA (Llama, Qwen3, Qwen3-MoE): K and V after rope, `[slots + 1, max_len, Hkv, D]` each.
- MLA (DeepSeek-V3): the normed compressed latent `[slots + 1, max_len, kv_rank]` and the shared
  rope key `[slots + 1, max_len, 1, rope_dim]`, i.e. (kv_rank + rope_dim) numbers per token
  instead of 2 * heads * head_dim: the point of MLA. K/V are expanded from it when attending.

Row `slots` (the last) is a scratch slot: padded positions of a ragged prefill write there, so a
padding write can never land on a real token. MoE models also get `experts`
`[slots + 1, max_len, moe_layers, topk]` int16: the experts chosen at every cached position, read
out once when a sample finishes (no per-step device-to-host copy).
"""

from __future__ import annotations

import torch

from miles_core.model.attention import MLAttention

__all__ = ["KVCache"]

_CACHE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class KVCache:
    def __init__(self, model, slots: int, max_len: int, device=None, dtype: torch.dtype | None = None):
        ref = model.lm_head.weight
        device = device if device is not None else ref.device
        dtype = dtype or (ref.dtype if ref.dtype in _CACHE_DTYPES else torch.bfloat16)
        self.slots, self.max_len, self.scratch = slots, max_len, slots
        rows = slots + 1
        self.a: list[torch.Tensor] = []  # K (GQA) or latent (MLA), per layer
        self.b: list[torch.Tensor] = []  # V (GQA) or rope key (MLA), per layer
        for layer in model.model.layers:
            attn = layer.self_attn
            if isinstance(attn, MLAttention):
                self.a.append(torch.zeros(rows, max_len, attn.kv_rank, device=device, dtype=dtype))
                self.b.append(torch.zeros(rows, max_len, 1, attn.rope_dim, device=device, dtype=dtype))
            else:
                shape = (rows, max_len, attn.n_kv, attn.head_dim)
                self.a.append(torch.zeros(shape, device=device, dtype=dtype))
                self.b.append(torch.zeros(shape, device=device, dtype=dtype))
        n_moe, k = model.num_moe_layers, model.config.num_experts_per_tok
        self.experts = torch.zeros(rows, max_len, n_moe, k, device=device, dtype=torch.int16) if n_moe else None

    @property
    def nbytes(self) -> int:
        tensors = [*self.a, *self.b] + ([self.experts] if self.experts is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def write(self, layer: int, slot: torch.Tensor, pos: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """slot, pos: [B, T] long; a, b: [B, T, ...] -> cache[layer][slot, pos] (index_put: graph-capturable)."""
        self.a[layer][slot, pos] = a.to(self.a[layer].dtype)
        self.b[layer][slot, pos] = b.to(self.b[layer].dtype)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [B] -> the first `length` positions of each: ([B, length, ...], [B, length, ...])."""
        return self.a[layer][slots, :length], self.b[layer][slots, :length]

    def write_experts(self, slot: torch.Tensor, pos: torch.Tensor, experts: torch.Tensor) -> None:
        """experts [B, T, moe_layers, k] chosen at (slot, pos) [B, T]."""
        if self.experts is not None:
            self.experts[slot, pos] = experts.to(torch.int16)

    def read_experts(self, slot: int, length: int) -> torch.Tensor | None:
        """The experts of a slot's first `length` positions, on the CPU: [length, moe_layers, k] int16."""
        return None if self.experts is None else self.experts[slot, :length].to("cpu", copy=True)  # own storage

    def copy(self, src: int, dsts: list[int], length: int) -> None:
        """Copy a slot's first `length` positions into other slots (a group sharing one prompt prefill)."""
        if not dsts:
            return
        idx = torch.tensor(dsts, device=self.a[0].device)
        for t in [*self.a, *self.b] + ([self.experts] if self.experts is not None else []):
            t[idx, :length] = t[src, :length]
