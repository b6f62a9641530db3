"""Triton kernels of the GQA decode attention (imported only through `flash_decode.py`, so that
miles_core imports without triton). See flash_decode.py for what they compute and why.

- `split_kernel`: program (row b, KV head h, split s) attends the G query heads of h over keys
  [s * CHUNK, min((s + 1) * CHUNK, len_b)) of slot `slot_b`, read straight from the cache tensor
  (any slot, any strides with a contiguous head dim): an online softmax over BN-key blocks, scores
  and accumulator in fp32, P cast to the value dtype for the second dot (what flash attention does).
  Writes the un-normalised partial output and its running max / sum, or (one split) the output.
- `combine_kernel`: program (row b, query head) merges the splits' partials with their maxima.
Whichever kernel writes the output can also write it quantized to FP8 (QUANT), for an FP8 o_proj.
"""

from __future__ import annotations

import triton
import triton.language as tl

from miles_core.kernels.quant_triton import _quantize_rows


@triton.jit
def split_kernel(
    Q, K, V, SLOT, LEN, OUT, ACC, MAX, SUM,
    stride_qb, stride_qh,
    stride_ks, stride_kl, stride_kh,
    stride_vs, stride_vl, stride_vh,
    stride_ob, stride_oh,
    scale, CHUNK, NSPLIT, QOUT, QS, EPS,
    G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DIRECT: tl.constexpr,
    QUANT: tl.constexpr = False,
):  # fmt: skip
    # Q [B, Hq, D]; K, V [slots, max_len, Hkv, D]; SLOT, LEN [B]; OUT [B, Hq, D] (DIRECT);
    # QUANT (D == 128): also each head's output row quantized as fp8_act_quant_kernel quantizes OUT viewed as
    # [B, Hq * D] (a head is one 1x128 tile): QOUT [B, Hq * D] e4m3, QS [B, Hq] fp32, contiguous; written here
    # with one split, else by combine_kernel.
    # ACC [B, Hq, NSPLIT, D] fp32, MAX / SUM [B, Hq, NSPLIT] fp32 (split partials), contiguous.
    # CHUNK and NSPLIT are runtime values: one compiled kernel serves every read length.
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(SLOT + b).to(tl.int64)
    n = tl.load(LEN + b)
    g = tl.arange(0, BG)
    d = tl.arange(0, D)
    heads = h * G + g  # [BG] query heads of KV head h (rows >= G are padding for the dot's M >= 16)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, n)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    k_base = K + slot * stride_ks + h * stride_kh
    v_base = V + slot * stride_vs + h * stride_vh
    for lo in range(start, end, BN):  # every block holds at least one key < end
        keys = lo + tl.arange(0, BN)
        valid = keys < end
        k = tl.load(k_base + keys[:, None] * stride_kl + d[None, :], mask=valid[:, None], other=0.0)  # [BN, D]
        scores = tl.dot(q, tl.trans(k)) * scale  # [BG, BN] fp32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vl + d[None, :], mask=valid[:, None], other=0.0)  # [BN, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    keep = (g < G)[:, None]
    if DIRECT:  # one split: normalise and write the output
        out = (acc / l_i[:, None]).to(OUT.dtype.element_ty)
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out, keep)
        if QUANT:
            _store_quantized(out, QOUT, QS, b, heads, d, g < G, G * tl.num_programs(1), EPS, D)
    else:
        row = (b * G * tl.num_programs(1) + heads) * NSPLIT + s  # [BG] index into [B, Hq, NSPLIT]
        tl.store(ACC + row[:, None] * D + d[None, :], acc, keep)
        tl.store(MAX + row, m_i, g < G)
        tl.store(SUM + row, l_i, g < G)


@triton.jit
def _store_quantized(out, QOUT, QS, b, heads, d, live, HQ, EPS, D: tl.constexpr):
    # out [R, D] (the output rows of query heads `heads` [R] of row b, in OUT's dtype; rows with `live`
    # False are padding) -> their 1x128 tiles quantized as the act-quant kernel does (from the stored
    # 16-bit values: the same bits)
    q, sc = _quantize_rows(out.to(tl.float32), EPS)
    tl.store(QOUT + (b * HQ + heads[:, None]) * D + d[None, :], q.to(QOUT.dtype.element_ty), live[:, None])
    tl.store(QS + b * HQ + heads, sc, live)


@triton.jit
def combine_kernel(
    ACC, MAX, SUM, OUT, stride_ob, stride_oh, HQ, NSPLIT, QOUT, QS, EPS,
    SP: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr = False,
):  # fmt: skip
    # Partials of (row b, head hq) over NSPLIT splits -> OUT[b, hq] = sum_s w_s acc_s / sum_s w_s l_s,
    # w_s = exp(m_s - max_s m_s). Split 0 always holds key 0, so the maximum is finite. QUANT: as in
    # split_kernel.
    b, hq = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    row = (b * HQ + hq) * NSPLIT + s  # [SP]
    m = tl.load(MAX + row, mask=s < NSPLIT, other=float("-inf"))
    l_s = tl.load(SUM + row, mask=s < NSPLIT, other=0.0)
    acc = tl.load(ACC + row[:, None] * D + d[None, :], mask=(s < NSPLIT)[:, None], other=0.0)  # [SP, D]
    w = tl.exp(m - tl.max(m, 0))  # empty splits: exp(-inf) = 0
    out = (tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)).to(OUT.dtype.element_ty)
    tl.store(OUT + b * stride_ob + hq * stride_oh + d, out)
    if QUANT:
        one = tl.arange(0, 1)
        _store_quantized(out[None, :], QOUT, QS, b, hq + one, d, one == 0, HQ, EPS, D)
