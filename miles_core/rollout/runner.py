"""The cached forward: one function for prefill, decode (and, later, speculative verification).

A step feeds each row b a run of `n_valid[b]` new tokens at positions `start[b]...` of its slot:
prefill is `start = 0, n_valid = prompt length`, decode is `n_valid = 1`, a speculative verify
would be `n_valid = k + 1` at the current length. Rows are right-padded to a common T; padded
positions write to the cache's scratch slot and their outputs are ignored. Each layer writes its
new K/V (or MLA latent) into the slot first, then attends over the slot's first `read_len`
positions with the mask `key <= query position`, so causal attention over the cache and over the
fresh tokens is one code path.

The forward walks the model core's modules (`embed_tokens`, each layer's norms, attention pieces
`qkv` / `query` + `latent` + `expand`, and `mlp`), so it computes exactly what `CausalLM.forward`
computes, only over cached positions; the MoE layers return the experts they chose, which are
stored beside the KV entries. Logits are computed only where they are needed (the last fed
position of each row, unless `all_logits`): a prompt's other positions never touch the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_core.model.attention import MLAttention, attend
from miles_core.rollout.cache import KVCache

__all__ = ["StepBatch", "forward_step"]


@dataclass
class StepBatch:
    tokens: torch.Tensor  # [B, T] long, right-padded
    slots: torch.Tensor  # [B] long
    start: torch.Tensor  # [B] long, position of tokens[:, 0]
    n_valid: torch.Tensor  # [B] long, real tokens per row (>= 1)
    read_len: int  # attend over positions [0, read_len) of each slot; >= max(start + n_valid)

    @classmethod
    def build(cls, rows: list[tuple[list[int], int, int]], device, read_len: int | None = None) -> StepBatch:
        """rows: (new tokens, slot, start position) per row."""
        t = max(len(r[0]) for r in rows)
        tokens = torch.zeros(len(rows), t, dtype=torch.long)  # [B, T]
        for i, (ids, _, _) in enumerate(rows):
            tokens[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        need = max(start + len(ids) for ids, _, start in rows)
        return cls(
            tokens=tokens.to(device),
            slots=torch.tensor([r[1] for r in rows], dtype=torch.long, device=device),
            start=torch.tensor([r[2] for r in rows], dtype=torch.long, device=device),
            n_valid=torch.tensor([len(r[0]) for r in rows], dtype=torch.long, device=device),
            read_len=max(read_len or 0, need),
        )


def _attention(attn, h, cos, sin, cache: KVCache, layer: int, wslot, wpos, batch: StepBatch, mask):
    """h: [B, T, H] -> attention output [B, T, H], after writing this step's entries into the cache."""
    if isinstance(attn, MLAttention):
        q = attn.query(h, cos, sin)  # [B, T, Hq, nope + R]
        cache.write(layer, wslot, wpos, *attn.latent(h, cos, sin))  # latent [B, T, r], rope key [B, T, 1, R]
        k, v = attn.expand(*cache.read(layer, batch.slots, batch.read_len))  # [B, L, Hq, *]
    else:
        q, k_new, v_new = attn.qkv(h, cos, sin)  # [B, T, H*, D]
        cache.write(layer, wslot, wpos, k_new, v_new)
        k, v = cache.read(layer, batch.slots, batch.read_len)  # [B, L, Hkv, D]
    out = attend(q, k.to(q.dtype), v.to(q.dtype), mask, attn.scale)  # [B, T, Hq, Dv]
    return attn.o_proj(out.flatten(2))


def forward_step(model, cache: KVCache, batch: StepBatch, all_logits: bool = False) -> torch.Tensor:
    """Run the new tokens through the model over the cache -> logits [B, V] at each row's last real
    token ([B, T, V] with `all_logits`), float as the LM head gives them. Records KV and experts."""
    b, t = batch.tokens.shape
    device = batch.tokens.device
    offs = torch.arange(t, device=device)  # [T]
    pos = batch.start[:, None] + offs[None]  # [B, T]
    valid = offs[None] < batch.n_valid[:, None]  # [B, T]
    wslot = torch.where(valid, batch.slots[:, None], cache.scratch)  # padding goes to the scratch slot
    wpos = torch.where(valid, pos, offs[None].expand(b, t))
    keys = torch.arange(batch.read_len, device=device)  # [L]
    mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, T, L] True = may attend

    backbone = model.model
    x = backbone.embed_tokens(batch.tokens)  # [B, T, H]
    cos, sin = backbone.rotary(pos, x.dtype)
    chosen = []
    for i, layer in enumerate(backbone.layers):
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, cache, i, wslot, wpos, batch, mask)
        h = layer.post_attention_layernorm(x)
        if layer.is_moe:
            h, experts = layer.mlp(h, None)  # experts [B*T, k]
            chosen.append(experts.view(b, t, -1))
        else:
            h = layer.mlp(h)
        x = x + h
    if chosen:
        cache.write_experts(wslot, wpos, torch.stack(chosen, dim=2))  # [B, T, moe_layers, k]
    if all_logits:
        return model.lm_head(backbone.norm(x))  # [B, T, V]
    last = x[torch.arange(b, device=device), batch.n_valid - 1]  # [B, H]
    return model.lm_head(backbone.norm(last))  # [B, V]
