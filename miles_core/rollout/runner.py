"""The cached forward: one function for prefill, decode (and, later, speculative verification).

A step feeds each row b a run of `n_valid[b]` new tokens at positions `start[b]...` of its slot:
prefill is `start = 0, n_valid = prompt length`, decode is `n_valid = 1`, a speculative verify
would be `n_valid = k + 1` at the current length. Rows are right-padded to a common T; padded
positions write to the cache's scratch slot and their outputs are ignored. Each layer writes its
new K/V (or MLA latent) into the slot first, then attends over the slot's first `read_len`
positions with the mask `key <= query position`, so causal attention over the cache and over the
fresh tokens is one code path. A prefill whose rows all start at position 0 (`fresh`) skips the
read: it attends to its own K/V with the causal kernel (flash on CUDA), as the full forward does.

The forward walks the model core's modules (`embed_tokens`, each layer's norms, attention pieces
`qkv` / `query` + `latent` + `expand`, and `mlp`), so it computes what `CausalLM.forward`
computes, only over cached positions; the MoE layers return the experts they chose, which are
stored beside the KV entries. Logits are computed only where they are needed (the last fed
position of each row, unless `all_logits`): a prompt's other positions never touch the LM head.

On the GPU, GQA's q/k norms, rope and cache writes run as one kernel (`rope_norm_cache`) at decode and
at a fresh prefill (every token a row; the prefill then attends to the roped k the kernel returns).

Decode (T = 1) attends with `flash_decode` on the GPU for GQA (a Triton kernel that reads each
row's keys once, in place, up to the row's own length; see flash_decode.py), else with
`decode_attention`: GQA as grouped einsums (each KV head read once, never repeated per query head,
the reference and the CPU path), MLA in the absorbed form (the query is mapped into the latent
space with kv_b_proj's key half, scores and values are taken against the cached latent, and the
value half maps back), so a step reads kv_rank + rope_dim numbers per cached token and never
expands the whole cache to per-head K/V. `capture_safe` swaps the MoE block's host-synchronising
expert count (`bincount`) for a scatter-add so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miles_core.kernels.add_norm import add_rms_norm, combine_add_rms_norm, fused_ok
from miles_core.kernels.rope_cache import rope_cache_ok, rope_norm_cache
from miles_core.model.attention import MLAttention, attend
from miles_core.model.moe import sort_plan
from miles_core.rollout.cache import KVCache
from miles_core.rollout.flash_decode import flash_decode, flash_decode_ok
from miles_core.rollout.sampling import device_tensor

__all__ = ["StepBatch", "decode_attention", "forward_step", "moe_forward"]


@dataclass
class StepBatch:
    tokens: torch.Tensor  # [B, T] long, right-padded
    slots: torch.Tensor  # [B] long
    start: torch.Tensor  # [B] long, position of tokens[:, 0]
    n_valid: torch.Tensor  # [B] long, real tokens per row (>= 1)
    read_len: int  # attend over positions [0, read_len) of each slot; >= max(start + n_valid)
    all_slots: bool = False  # row i is slot i for every slot: the cache is read by slicing, no gather
    fresh: bool = False  # every row starts at position 0: attend to this step's own K/V, causally

    @classmethod
    def build(cls, rows: list[tuple[list[int], int, int]], device, read_len: int | None = None) -> StepBatch:
        """rows: (new tokens, slot, start position) per row."""
        t = max(len(r[0]) for r in rows)
        tokens = torch.zeros(len(rows), t, dtype=torch.long)  # [B, T]
        for i, (ids, _, _) in enumerate(rows):
            tokens[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        need = max(start + len(ids) for ids, _, start in rows)
        if torch.device(device).type == "cuda":  # pinned: queued without a stream sync
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        return cls(
            tokens=tokens.to(device),
            slots=device_tensor([r[1] for r in rows], torch.long, device),
            start=device_tensor([r[2] for r in rows], torch.long, device),
            n_valid=device_tensor([len(r[0]) for r in rows], torch.long, device),
            read_len=max(read_len or 0, need),
            fresh=all(r[2] == 0 for r in rows) and (read_len or 0) <= t,
        )


def _softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax over the last dim, in float32 at least, back in the scores' dtype."""
    s = scores.float().masked_fill(~mask, float("-inf"))
    return s.softmax(-1).to(scores.dtype)


def decode_attention(attn: nn.Module, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor):
    """Attention of a few new queries over a slot's cache -> [B, T, Hq, Dv].

    GQA: q [B, T, Hq, D], a = K, b = V [B, L, Hkv, D]. MLA: q [B, T, H, nope + R] (rope applied),
    a = latent [B, L, r], b = rope key [B, L, 1, R]. mask: bool [B, 1, T, L].
    """
    if isinstance(attn, MLAttention):
        return _mla_absorbed(attn, q, a, b, mask)
    bsz, t, hq, d = q.shape
    hkv = a.shape[2]
    qg = q.view(bsz, t, hkv, hq // hkv, d)  # [B, T, Hkv, G, D]
    scores = torch.einsum("bthgd,blhd->bhgtl", qg, a.to(q.dtype)) * attn.scale  # [B, Hkv, G, T, L]
    p = _softmax(scores, mask[:, :, None])  # mask [B, 1, 1, T, L]
    out = torch.einsum("bhgtl,blhd->bthgd", p, b.to(q.dtype))  # [B, T, Hkv, G, D]
    return out.reshape(bsz, t, hq, d)


def _mla_absorbed(attn: MLAttention, q: torch.Tensor, c: torch.Tensor, k_rot: torch.Tensor, mask: torch.Tensor):
    w = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope + attn.v_dim, attn.kv_rank)  # [H, nope + Dv, r]
    w_k, w_v = w[:, : attn.nope], w[:, attn.nope :]  # [H, nope, r], [H, Dv, r]
    q_nope, q_rot = q.split([attn.nope, attn.rope_dim], dim=-1)
    q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_k)  # the query in latent space
    c = c.to(q.dtype)
    scores = torch.einsum("bthr,blr->bhtl", q_lat, c) + torch.einsum(
        "bthd,bld->bhtl", q_rot, k_rot[:, :, 0].to(q.dtype)
    )
    p = _softmax(scores * attn.scale, mask)  # [B, H, T, L]
    out_lat = torch.einsum("bhtl,blr->bthr", p, c)  # [B, T, H, r]
    return torch.einsum("bthr,hvr->bthv", out_lat, w_v)  # [B, T, H, Dv]


def _absorbable(attn: nn.Module) -> bool:
    """MLA's absorbed decode needs kv_b_proj's dense weight (a quantized kv_b_proj takes the expand path)."""
    return not isinstance(attn, MLAttention) or type(attn.kv_b_proj) is nn.Linear


def _norm_weights(attn) -> tuple:
    return () if attn.q_norm is None else (attn.q_norm.weight, attn.k_norm.weight)


def _decode_qkv(attn, h, cos, sin, cache: KVCache, layer: int, wslot, wpos, xq=None) -> torch.Tensor:
    """GQA, one new token per row: the three projections, then `rope_norm_cache` (what `attn.qkv` +
    `cache.write` compute, in one launch) -> q [B, 1, Hq, D]; K and V are in the cache. `xq`: h's rows in
    FP8, quantized by the norm that made h (an FP8 projection reads them)."""
    q, k, v = attn.project(h, xq)  # [B, 1, Hq*D], [B, 1, Hkv*D] x2 (strided views of one GEMM when fused)
    return rope_norm_cache(
        q, k, v, *_norm_args(attn), cos, sin, cache.a[layer], cache.b[layer], wslot[:, 0], wpos[:, 0]
    )


def _norm_args(attn) -> tuple:
    """(q_norm weight, k_norm weight, eps) as `rope_norm_cache` takes them; (None, None, 0.0) without qk-norm."""
    qw, kw = _norm_weights(attn) or (None, None)
    return qw, kw, 0.0 if attn.q_norm is None else attn.q_norm.eps  # k_norm's eps too: both are cfg.rms_norm_eps


def _prefill_qkv(attn, h, cos, sin, cache: KVCache, layer: int, wslot, wpos, xq=None):
    """GQA, a prefill from position 0 (every token of the step is a row): the projections, then
    `rope_norm_cache` over the B * T rows (the norms, rope and cache writes that `attn.qkv` +
    `cache.write` do in ~14 launches of the whole [B, T, H, D] tensors, in one) -> q [B, T, Hq, D],
    k [B, T, Hkv, D] normed + roped, v [B, T, Hkv, D] (what the step's own causal attention reads)."""
    b, t, _ = h.shape
    d = cache.a[layer].shape[-1]
    q, k, v = attn.project(h, xq)  # [B, T, Hq*D], [B, T, Hkv*D] x2
    k_out = torch.empty(b, t, k.shape[-1] // d, d, dtype=h.dtype, device=h.device)
    a, c = cache.a[layer], cache.b[layer]
    q = rope_norm_cache(q, k, v, *_norm_args(attn), cos, sin, a, c, wslot.reshape(-1), wpos.reshape(-1), k_out)
    return q.view(b, t, -1, d), k_out, v.reshape(b, t, -1, d)


def _attention(attn, h, cos, sin, cache: KVCache, layer: int, wslot, wpos, batch: StepBatch, mask, ends, xq=None):
    """h: [B, T, H] -> attention output [B, T, H], after writing this step's entries into the cache.
    mask: [B, 1, T, L] bool; ends: [B] keys each row attends (start + n_valid); xq: h's rows in FP8 (from the
    norm's launch) where the q/k/v projection takes them (`GQAttention.takes_fp8_rows`)."""
    if isinstance(attn, MLAttention):
        q = attn.query(h, cos, sin)  # [B, T, Hq, nope + R]
        new = attn.latent(h, cos, sin)  # latent [B, T, r], rope key [B, T, 1, R]
        cache.write(layer, wslot, wpos, *new)
    elif not batch.fresh and rope_cache_ok(h, cos, cache.a[layer], _norm_weights(attn)):
        # decode on the GPU: q/k norm, rope and both cache writes in one kernel (kernels/rope_cache.py)
        q, new = _decode_qkv(attn, h, cos, sin, cache, layer, wslot, wpos, xq), None  # q [B, 1, Hq, D]
    elif batch.fresh and rope_cache_ok(h, cos, cache.a[layer], _norm_weights(attn), True):
        # a prefill on the GPU: the same kernel over every token of the step
        q, *new = _prefill_qkv(attn, h, cos, sin, cache, layer, wslot, wpos, xq)
    else:
        q, *new = attn.qkv(h, cos, sin)  # q [B, T, Hq, D]; k, v [B, T, Hkv, D]
        cache.write(layer, wslot, wpos, *new)
    if q.shape[1] == 1 and not isinstance(attn, MLAttention) and flash_decode_ok(q, cache.a[layer]):
        # one new token per row: read the cache in place, each row only up to its own length
        args = (q[:, 0], cache.a[layer], cache.b[layer], batch.slots, ends, attn.scale, batch.read_len)
        if _o_proj_takes_fp8_rows(attn, q):  # the kernel also writes its rows in FP8 for the FP8 o_proj
            out, xq_o = flash_decode(*args, quant=True)
            return attn.o_proj(out.view(q.shape[0], 1, -1), xq_o)  # [B, 1, H]
        out = flash_decode(*args)
        return attn.o_proj(out.view(q.shape[0], 1, -1))  # [B, 1, H]
    if batch.fresh:  # a prefill from position 0: the cache holds nothing else, so attend like a full forward
        k, v = attn.expand(*new) if isinstance(attn, MLAttention) else new
        out = attend(q, k, v, None, attn.scale)  # causal (flash on CUDA); right padding never reaches real rows
        return attn.o_proj(out.flatten(2))
    if batch.all_slots:  # row i is slot i: a view of the cache, no gather
        a, b = (
            cache.a[layer][: len(batch.slots), : batch.read_len],
            cache.b[layer][: len(batch.slots), : batch.read_len],
        )
    else:
        a, b = cache.read(layer, batch.slots, batch.read_len)
    if q.shape[1] == 1 and _absorbable(attn):
        out = decode_attention(attn, q, a, b, mask)
    else:
        k, v = attn.expand(a, b) if isinstance(attn, MLAttention) else (a, b)
        out = attend(q, k.to(q.dtype), v.to(q.dtype), mask, attn.scale)  # [B, T, Hq, Dv]
    return attn.o_proj(out.flatten(2))


def _o_proj_takes_fp8_rows(attn, q: torch.Tensor) -> bool:
    """o_proj is an FP8 linear that would read its input rows pre-quantized (decode sizes), and a head is one
    1x128 quantization tile, so `flash_decode(quant=True)` can write them."""
    from miles_core.kernels.fp8_gemm import dense_takes_fp8_rows
    from miles_core.quant.layers import Fp8Linear

    o = attn.o_proj
    return type(o) is Fp8Linear and q.shape[-1] == 128 and dense_takes_fp8_rows(q.shape[0], o.weight)


def _attn_takes_fp8_rows(layer, h: torch.Tensor) -> bool:
    """The layer's attention projects h from FP8 rows (`GQAttention.takes_fp8_rows`): the norm that makes h
    quantizes them in its own launch."""
    takes = getattr(layer.self_attn, "takes_fp8_rows", None)
    return takes is not None and takes(h)


def moe_forward(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model core's MoE block (its dispatch needs no host sync, so a CUDA graph can capture it).

    x: [B, T, H] -> (out [B, T, H], experts [B*T, k]).
    """
    return mlp(x)


def _layers(backbone, x: torch.Tensor, attention, capture_safe: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder layers as the model core runs them: x [B, T, H], attention(i, layer, h) -> (the
    last layer's output [B, T, H], experts [B*T, k] per MoE layer)."""
    chosen = []
    for i, layer in enumerate(backbone.layers):
        h = layer.input_layernorm(x)
        x = x + attention(i, layer, h)
        h = layer.post_attention_layernorm(x)
        if layer.is_moe:
            h, experts = moe_forward(layer.mlp, h) if capture_safe else layer.mlp(h, None)  # experts [B*T, k]
            chosen.append(experts)
        else:
            h = layer.mlp(h)
        x = x + h
    return x, chosen


def _fused_layers(backbone, x: torch.Tensor, attention) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder layers with each residual add fused into the RMSNorm after it, and a MoE layer's
    combine into both (two launches per layer instead of five): x [B, T, H], attention(i, layer, h, xq)
    -> (backbone.norm of the last layer's output [B, T, H], experts [B*T, k] per MoE layer). xq: h's rows
    in FP8 when the add + norm that made h quantized them for an FP8 q/k/v (`_attn_takes_fp8_rows`), else None.

    Row for row what the unfused loop computes: the residual sums bit for bit, each normed row
    within one ulp of F.rms_norm (float32 statistics summed in another order). Norms are row-wise,
    so norming every row and then taking the last positions equals the unfused gather-then-norm.
    """
    layers = backbone.layers
    next_norms = [layer.input_layernorm for layer in layers[1:]] + [backbone.norm]
    h = layers[0].input_layernorm(x)
    attn_rows = None  # h's rows in FP8 for the next attention's projection, when the norm quantized them
    chosen = []
    for i, (layer, nxt) in enumerate(zip(layers, next_norms, strict=True)):
        post, mlp = layer.post_attention_layernorm, layer.mlp
        quant = _norm_quantizes(layer, h)
        out = attention(i, layer, h, attn_rows)
        x, h, *xq = add_rms_norm(x, out, post.weight, post.eps, quant=quant)  # [B, T, H] each
        if layer.is_moe and mlp.shared_experts is None:
            flat = h.reshape(-1, h.shape[-1])  # [N, H]
            weights, experts, plan = mlp.gate.route(flat)  # [N, k] each
            src, inverse, counts = plan if plan is not None else sort_plan(flat, experts, mlp.gate.n_experts)
            fp8_rows = {"xq": xq[0]} if quant else {}  # h's rows in FP8, quantized by the norm's launch
            ys = mlp.experts.sorted_forward(flat, counts, src, **fp8_rows)  # [N*k, H], expert-sorted rows
            x, h = combine_add_rms_norm(ys, inverse, weights, x, nxt.weight, nxt.eps)
            nq = ()  # the next q/k/v quantizes these rows itself: in the combine kernel it cost more (RESULTS)
        else:  # dense MLP, or MoE + shared experts (DeepSeek-V3): the block as it is, then add + norm
            out, experts = mlp(h, None) if layer.is_moe else (mlp(h), None)
            quant_next = i + 1 < len(layers) and _attn_takes_fp8_rows(layers[i + 1], h)
            x, h, *nq = add_rms_norm(x, out, nxt.weight, nxt.eps, quant=quant_next)
        attn_rows = nq[0] if nq else None
        if layer.is_moe:
            chosen.append(experts)
    return h, chosen


def _norm_quantizes(layer, h: torch.Tensor) -> bool:
    """The MoE after this layer's attention takes its input rows in FP8 (`QuantExperts.takes_fp8_rows`),
    so the norm before it quantizes them in its own launch (the act-quant's bits, one launch fewer)."""
    mlp = layer.mlp
    if not (layer.is_moe and mlp.shared_experts is None and hasattr(mlp.experts, "takes_fp8_rows")):
        return False
    tokens = h.numel() // h.shape[-1]
    return mlp.experts.takes_fp8_rows(h, tokens * mlp.gate.top_k)


def forward_step(
    model, cache: KVCache, batch: StepBatch, all_logits: bool = False, capture_safe: bool = False
) -> torch.Tensor:
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
    ends = batch.start + batch.n_valid  # [B]

    backbone = model.model
    x = backbone.embed_tokens(batch.tokens)  # [B, T, H]
    cos, sin = backbone.rotary(pos, x.dtype)

    def attention(i, layer, h, xq=None):
        return _attention(layer.self_attn, h, cos, sin, cache, i, wslot, wpos, batch, mask, ends, xq)

    fused = fused_ok(x)  # the GPU: residual adds fused into the norms after them (kernels/add_norm.py)
    if fused:
        x, chosen = _fused_layers(backbone, x, attention)  # x: already through backbone.norm
    else:
        x, chosen = _layers(backbone, x, attention, capture_safe)
    if chosen:
        cache.write_experts(wslot, wpos, torch.stack([e.view(b, t, -1) for e in chosen], dim=2))  # [B, T, L_moe, k]
    norm = (lambda y: y) if fused else backbone.norm
    if all_logits:
        return model.lm_head(norm(x))  # [B, T, V]
    if fused and t == 1:  # decode: the last position is the only one, no gather
        return model.lm_head(x[:, 0])  # [B, V]
    last = x[torch.arange(b, device=device), batch.n_valid - 1]  # [B, H]
    return model.lm_head(norm(last))  # [B, V]
