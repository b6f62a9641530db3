"""GQA decode attention straight from the slot cache (flash decoding), and its reference.

A decode step's attention is a memory-bound read of every running sample's K/V. The reference
(`runner.decode_attention`, the CPU path) attends over a [B, read_len] view of the cache with
einsums: each einsum copies the strided K (then V) into a contiguous buffer first, materialises
float32 scores and a mask over the whole bucket-rounded `read_len`, and runs several kernels per
layer. On the GPU that read and wrote the cache about three times per step (bench/RESULTS.md).

`flash_decode` reads each row's keys once, only up to its own length (not the bucket), from the
cache tensor itself (any slot per row, so no gather): the keys of a row are split into chunks
processed by separate programs (`split_kernel`, online softmax, fp32 accumulation, the G query
heads of one KV head together so each K/V block is loaded once for all of them), and a second
small kernel merges the chunks (`combine_kernel`). With one chunk per row (large batches) the first
kernel writes the output directly. Both kernels have static grids for a given (batch, read_len),
so a CUDA graph captures them; a row's result does not depend on the other rows.
"""

from __future__ import annotations

import functools
import os

import torch

from miles_core.quant.fp8 import ACT_EPS, FP8_DTYPE

__all__ = ["flash_decode", "flash_decode_ok", "flash_decode_reference", "launch_config"]

CHUNK_UNIT = 128  # key chunks are multiples of this (and so of the block size below)
TARGET_PROGRAMS = 256  # split rows until about this many programs run: on an H200, 64 rows x 4 KV heads ran
# fastest unsplit (32.1 us at ~770 keys vs 40.6 with 4 splits + the combine; bench/decode_kernels.py)
# (keys per block, warps, pipeline stages) of the split kernel: fixed, not autotuned. On an H200 at 64 rows
# x 512-1024 keys, 32 / 4 KV heads of 128, two sweeps of 54 and 48 configs (bench/RESULTS.md, thirteenth
# session) put (64, 4, 3) first, 30.8 us both times; triton.autotune, which this replaced, picked (64, 8, 3),
# (128, 8, 2) or (32, 2, 3) on different machine starts: 30.6-35.3 us. A read-only probe of the same K/V
# bytes in the same pattern takes 28.5 us, so the kernel is within 8% of its reads.
CONFIG = (64, 4, 3)


@functools.cache
def _kernels():
    """(split kernel, launch kwargs, combine kernel)."""
    from miles_core.rollout import flash_decode_triton as k

    bn, warps, stages = CONFIG
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return k.split_kernel, {"BN": bn}, k.combine_kernel
    return k.split_kernel, {"BN": bn, "num_warps": warps, "num_stages": stages}, k.combine_kernel


def launch_config() -> str:
    """The split kernel's launch configuration (for benchmark logs)."""
    bn, warps, stages = CONFIG
    return f"BN {bn}, {warps} warps, {stages} stages"


def flash_decode_ok(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """The Triton kernel applies: CUDA, 16-bit, head_dim a power of two >= 16, whole query groups."""
    d = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and cache_k.dtype == q.dtype
        and d >= 16
        and d & (d - 1) == 0
        and q.shape[-2] % cache_k.shape[2] == 0
        and cache_k.stride(-1) == 1
    )


def splits_for(batch: int, kv_heads: int, read_len: int) -> tuple[int, int]:
    """(number of key chunks per row, chunk length, a multiple of CHUNK_UNIT) for a static grid."""
    units = -(-read_len // CHUNK_UNIT)
    nsplit = max(1, min(units, -(-TARGET_PROGRAMS // (batch * kv_heads))))
    chunk = -(-units // nsplit) * CHUNK_UNIT
    return -(-read_len // chunk), chunk


def flash_decode(
    q: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    read_len: int,
    quant: bool = False,
):
    """q [B, Hq, D]; cache_k / cache_v [slots, max_len, Hkv, D]; slots, lengths [B] (row b attends
    keys [0, lengths[b]) of slot slots[b], 1 <= lengths[b] <= read_len) -> out [B, Hq, D] in q.dtype.

    `quant` (D = 128): -> (out, (q8 [B, Hq * D] e4m3, scale [B, Hq] fp32)), out's rows [B, Hq * D] also
    quantized as `fp8_gemm.fp8_act_quant` does (each head one 1x128 tile; the same bits) by the kernel that
    writes them, for an FP8 o_proj (`fp8_gemm.fp8_linear(out, ..., xq=...)`): one act-quant launch fewer."""
    b, hq, d = q.shape
    if quant and d != 128:
        raise ValueError(f"flash_decode(quant=True) needs head_dim 128 (one 1x128 FP8 tile per head), got {d}")
    hkv = cache_k.shape[2]
    g = hq // hkv
    nsplit, chunk = splits_for(b, hkv, read_len)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if quant:
        q8 = torch.empty(b, hq * d, dtype=FP8_DTYPE, device=q.device)
        qs = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    else:
        q8 = qs = out  # unused
    if nsplit == 1:
        acc = mx = sm = out  # unused by the kernel
    else:
        acc = torch.empty(b, hq, nsplit, d, dtype=torch.float32, device=q.device)
        mx = torch.empty(b, hq, nsplit, dtype=torch.float32, device=q.device)
        sm = torch.empty_like(mx)
    split, extra, combine = _kernels()
    split[(b, hkv, nsplit)](
        q, cache_k, cache_v, slots, lengths, out, acc, mx, sm,
        q.stride(0), q.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        out.stride(0), out.stride(1),
        scale, chunk, nsplit, q8, qs, ACT_EPS,
        G=g, BG=max(16, triton_pow2(g)), D=d, DIRECT=nsplit == 1, QUANT=quant, **extra,
    )  # fmt: skip
    if nsplit > 1:
        combine[(b, hq)](
            acc, mx, sm, out, out.stride(0), out.stride(1), hq, nsplit, q8, qs, ACT_EPS, triton_pow2(nsplit), d,
            QUANT=quant,
        )  # fmt: skip
    return (out, (q8, qs)) if quant else out


def flash_decode_reference(q, cache_k, cache_v, slots, lengths, scale: float, read_len: int) -> torch.Tensor:
    """The same in plain torch (float32 softmax), for tests: q [B, Hq, D] -> [B, Hq, D]."""
    b, hq, d = q.shape
    k, v = cache_k[slots, :read_len].float(), cache_v[slots, :read_len].float()  # [B, L, Hkv, D]
    g = hq // k.shape[2]
    qg = q.float().view(b, k.shape[2], g, d)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    keep = torch.arange(read_len, device=q.device)[None] < lengths[:, None]  # [B, L]
    p = scores.masked_fill(~keep[:, None, None], float("-inf")).softmax(-1)
    return torch.einsum("bhgl,blhd->bhgd", p, v).reshape(b, hq, d).to(q.dtype)


def triton_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
