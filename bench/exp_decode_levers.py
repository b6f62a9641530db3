"""Experiments on the batch-64 decode step's remaining overheads (Qwen3-30B-A3B shapes, H200).

    PYTHONPATH=. python bench/exp_decode_levers.py [--only flash|prefetch]

- flash: `flash_decode`'s split kernel at every (keys per block, warps, stages) and 1 / 2 / 4 splits
  (with the combine launch), as bandwidth over the K/V bytes, against the default launch.
- prefetch: a MoE layer's tail at decode, [o_proj GEMM, add + RMSNorm (FP8 rows), router GEMM, top-k +
  sort, FP8 experts], 8 layers of weights rotating (CUDA graph), with and without an L2 prefetch of the
  gate_up GEMM's first weight blocks launched on a side stream while the latency-bound kernels run
  (before or after the o_proj), for several prefetch sizes. Outputs compared bit for bit.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from bench.decode_kernels import bandwidth, graph_us


def flash(bw: float) -> None:
    from miles_core.rollout import flash_decode as fd
    from miles_core.rollout import flash_decode_triton as k

    b = 64
    g = torch.Generator().manual_seed(b)
    lengths = torch.randint(512, 1025, (b,), generator=g).cuda()
    q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b + 1, 1025, 4, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    slots = torch.arange(b, device="cuda")
    nbytes = int(lengths.sum()) * 4 * 128 * 2 * 2
    ref = fd.flash_decode_reference(q, kc, vc, slots, lengths, 128**-0.5, 1024)
    default = lambda: fd.flash_decode(q, kc, vc, slots, lengths, 128**-0.5, 1024)  # noqa: E731
    default()
    us0 = graph_us(default)
    print(f"\nflash_decode default ({fd.tuned()}): {us0:.1f} us, {nbytes / (us0 * 1e-6) / bw:.2f}x copy bw")
    print("\n| splits | BN | warps | stages | us | x copy bw | vs default | max err |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for nsplit, bn, w, st in itertools.product((1, 2), (32, 64, 128), (4, 8), (3, 4, 5, 6)):
        chunk = -(-1024 // nsplit // 128) * 128
        ns = -(-1024 // chunk)
        out = torch.empty(b, 32, 128, dtype=q.dtype, device="cuda")
        acc = torch.empty(b, 32, ns, 128, dtype=torch.float32, device="cuda")
        mx = torch.empty(b, 32, ns, dtype=torch.float32, device="cuda")
        sm = torch.empty_like(mx)

        def run(bn=bn, w=w, st=st, ns=ns, chunk=chunk, out=out, acc=acc, mx=mx, sm=sm):
            k.split_kernel[(b, 4, ns)](
                q, kc, vc, slots, lengths, out, acc, mx, sm,
                q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
                vc.stride(0), vc.stride(1), vc.stride(2), out.stride(0), out.stride(1),
                128**-0.5, chunk, ns, G=8, BG=16, D=128, DIRECT=ns == 1, BN=bn, num_warps=w, num_stages=st,
            )  # fmt: skip
            if ns > 1:
                p2 = fd.triton_pow2(ns)
                k.combine_kernel[(b, 32)](acc, mx, sm, out, out.stride(0), out.stride(1), 32, ns, p2, 128)
            return out

        try:
            out.fill_(float("nan"))
            err = float((run().float() - ref.float()).abs().max())
            us = graph_us(run)
        except Exception as exc:  # resources
            print(f"| {ns} | {bn} | {w} | {st} | failed: {type(exc).__name__} | | | |")
            continue
        results.append((us, ns, bn, w, st))
        ratio = nbytes / (us * 1e-6) / bw
        print(f"| {ns} | {bn} | {w} | {st} | {us:.1f} | {ratio:.2f} | {us0 / us:.2f}x | {err:.1e} |", flush=True)
    results.sort()
    print("best five:", results[:5])


_PF = tl.constexpr("prefetch.global.L2 [$1]; mov.u32 $0, 0;")
_PF_LAST = tl.constexpr("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;")


@triton.jit
def _prefetch_kernel(W, stride_e, stride_n, ROWS: tl.constexpr, LINES: tl.constexpr, EVICT_LAST: tl.constexpr):
    # program (n tile, expert): prefetch into L2 the first LINES 128-byte lines of ROWS weight rows
    n, e = tl.program_id(0), tl.program_id(1)
    r = n * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, LINES) * 128
    ptrs = W + e.to(tl.int64) * stride_e + r[:, None] * stride_n + c[None, :]
    if EVICT_LAST:
        tl.inline_asm_elementwise(_PF_LAST, "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(_PF, "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(bw: float) -> None:
    import torch.nn.functional as F

    from miles_core.kernels import add_norm, fp8_gemm, moe_route
    from miles_core.quant import fp8_block_quantize

    tokens, layers, e, hidden, inter = 64, 8, 128, 2048, 768
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02  # noqa: E731
    ws = []
    for _ in range(layers):
        w1, s1 = fp8_block_quantize(mk(e, 2 * inter, hidden))
        w2, s2 = fp8_block_quantize(mk(e, hidden, inter))
        ws.append(dict(wo=mk(hidden, 4096), norm=torch.ones(hidden, device="cuda", dtype=torch.bfloat16),
                       router=mk(e, hidden), w1=w1, s1=s1, w2=w2, s2=s2))  # fmt: skip
    attn = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    x0 = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def layer(lw, x, pre):
        if pre is not None and pre[0] == "start":
            fork(lw, pre)
        a = F.linear(attn, lw["wo"])
        if pre is not None and pre[0] == "after_o":
            fork(lw, pre)
        x, h, (q, s) = add_norm.add_rms_norm(x, a, lw["norm"], 1e-6, quant=True)
        logits = F.linear(h, lw["router"])
        weights, experts, (src, inverse, counts) = moe_route.topk_route(logits, 8, True, 1.0, h.dtype)
        if pre is not None:
            torch.cuda.current_stream().wait_stream(side)
        ys = fp8_gemm.grouped_fp8_experts(h, counts, lw["w1"], lw["s1"], lw["w2"], lw["s2"], src, (q, s))
        return x + ys[:tokens]  # keeps the chain dependent; not the model's combine

    def fork(lw, pre):
        _, n_tiles, lines, evict = pre
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            w1 = lw["w1"]
            _prefetch_kernel[(n_tiles, e)](w1, w1.stride(0), w1.stride(1), ROWS=64, LINES=lines, EVICT_LAST=evict)

    def step(pre=None):
        x = x0
        for lw in ws:
            x = layer(lw, x, pre)
        return x

    with torch.inference_mode():
        want = step()
        base = graph_us(step, calls=4) / layers
        print("\n| prefetch (where, 64-row tiles, 128 B lines, evict_last) | MB | us per layer | vs none | bits |")
        print("|---|---|---|---|---|")
        print(f"| none | 0 | {base:.1f} | 1.00x | - |")
        for where, n_tiles, lines, evict in itertools.product(
            ("start", "after_o"), (2, 4, 8), (2, 4, 8, 16), (False, True)
        ):
            mb = e * n_tiles * 64 * lines * 128 / 1e6
            if mb > 48:
                continue
            pre = (where, n_tiles, lines, evict)
            fn = lambda pre=pre: step(pre)  # noqa: E731
            same = torch.equal(fn(), want)
            us = graph_us(fn, calls=4) / layers
            print(f"| {where}, {n_tiles}, {lines}, {evict} | {mb:.0f} | {us:.1f} | {base / us:.3f}x | {same} |",
                  flush=True)  # fmt: skip


@triton.jit
def _heads_kernel(
    Q, K, V, SLOT, LEN, OUT, ACC, MAX, SUM,
    stride_qb, stride_qh, stride_ks, stride_kl, stride_vs, stride_vl, stride_ob, stride_oh,
    scale, CHUNK, NSPLIT,
    HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DIRECT: tl.constexpr,
):  # fmt: skip
    # program (row b, split s): every KV head at once (each key's HKV x D row is one contiguous run),
    # batched dots over the heads; K, V [slots, max_len, HKV, D] with a contiguous (HKV, D) row
    b, s = tl.program_id(0), tl.program_id(1)
    slot = tl.load(SLOT + b).to(tl.int64)
    n = tl.load(LEN + b)
    h = tl.arange(0, HKV)
    g = tl.arange(0, BG)
    d = tl.arange(0, D)
    heads = h[:, None] * G + g[None, :]  # [HKV, BG]
    qmask = (g < G)[None, :, None]
    q = tl.load(Q + b * stride_qb + heads[:, :, None] * stride_qh + d[None, None, :], mask=qmask, other=0.0)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, n)
    m_i = tl.full([HKV, BG], float("-inf"), tl.float32)
    l_i = tl.zeros([HKV, BG], tl.float32)
    acc = tl.zeros([HKV, BG, D], tl.float32)
    off = h[:, None, None] * D + d[None, None, :]  # [HKV, 1, D] within a key's row
    for lo in range(start, end, BN):
        keys = lo + tl.arange(0, BN)
        valid = keys < end
        kv_mask = valid[None, :, None]
        k = tl.load(K + slot * stride_ks + keys[None, :, None] * stride_kl + off, mask=kv_mask, other=0.0)
        v = tl.load(V + slot * stride_vs + keys[None, :, None] * stride_vl + off, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.permute(k, (0, 2, 1))) * scale  # [HKV, BG, BN]
        scores = tl.where(valid[None, None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 2))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if DIRECT:
        out = acc / l_i[:, :, None]
        tl.store(
            OUT + b * stride_ob + heads[:, :, None] * stride_oh + d[None, None, :], out.to(OUT.dtype.element_ty), qmask
        )
    else:
        row = (b * HKV * G + heads) * NSPLIT + s  # [HKV, BG]
        tl.store(ACC + row[:, :, None] * D + d[None, None, :], acc, qmask)
        tl.store(MAX + row, m_i, (g < G)[None, :])
        tl.store(SUM + row, l_i, (g < G)[None, :])


@triton.jit
def _read_kernel(K, V, SLOT, LEN, OUT, stride_ks, stride_kl, stride_kh, CHUNK,
                 ALL_HEADS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    # the flash kernels' reads alone: program (b, h or split) sums its K and V blocks (a bandwidth probe)
    b, j = tl.program_id(0), tl.program_id(1)
    slot = tl.load(SLOT + b).to(tl.int64)
    n = tl.load(LEN + b)
    if ALL_HEADS:
        cols = tl.arange(0, HKV * D)
        start, end = j * CHUNK, tl.minimum(j * CHUNK + CHUNK, n)
    else:
        cols = j * stride_kh + tl.arange(0, D)
        start, end = 0, n
    tot = tl.zeros([BN, cols.shape[0]], tl.float32)
    for lo in range(start, end, BN):
        keys = lo + tl.arange(0, BN)
        ptr = slot * stride_ks + keys[:, None] * stride_kl + cols[None, :]
        m = (keys < end)[:, None]
        tot += tl.load(K + ptr, mask=m, other=0.0).to(tl.float32) + tl.load(V + ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + b * tl.num_programs(1) + j, tl.sum(tot))


def heads(bw: float) -> None:
    """The all-heads flash variant and the two read patterns, at the bench shape (64 rows, 512-1024 keys)."""
    from miles_core.rollout import flash_decode as fd
    from miles_core.rollout import flash_decode_triton as fk

    b = 64
    g = torch.Generator().manual_seed(b)
    lengths = torch.randint(512, 1025, (b,), generator=g).cuda()
    q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b + 1, 1025, 4, 128, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    slots = torch.arange(b, device="cuda")
    nbytes = int(lengths.sum()) * 4 * 128 * 2 * 2
    ref = fd.flash_decode_reference(q, kc, vc, slots, lengths, 128**-0.5, 1024)
    print("\n| read probe | programs | BN | warps | stages | us | x copy bw |")
    print("|---|---|---|---|---|---|---|")
    for all_heads, nsplit, bn, w, st in itertools.product((False, True), (1, 2, 4), (32, 64), (4, 8), (3, 4, 5)):
        if not all_heads and nsplit > 1:
            continue
        chunk = -(-1024 // nsplit // 128) * 128
        grid = (b, -(-1024 // chunk)) if all_heads else (b, 4)
        out = torch.empty(grid, device="cuda")
        run = lambda grid=grid, out=out, chunk=chunk, ah=all_heads, bn=bn, w=w, st=st: _read_kernel[grid](  # noqa: E731
            kc, vc, slots, lengths, out, kc.stride(0), kc.stride(1), kc.stride(2), chunk,
            ALL_HEADS=ah, HKV=4, D=128, BN=bn, num_warps=w, num_stages=st)  # fmt: skip
        try:
            us = graph_us(run)
        except Exception as exc:
            name = "all heads" if all_heads else "per head"
            print(f"| {name} | {grid} | {bn} | {w} | {st} | failed {type(exc).__name__} | |")
            continue
        print(f"| {'all heads' if all_heads else 'per head'} | {grid} | {bn} | {w} | {st} | {us:.1f} | "
              f"{nbytes / (us * 1e-6) / bw:.2f} |", flush=True)  # fmt: skip
    print("\n| all-heads flash | splits | BN | warps | stages | us | x copy bw | max err |")
    print("|---|---|---|---|---|---|---|---|")
    for nsplit, bn, w, st in itertools.product((1, 2, 4), (16, 32, 64), (4, 8), (3, 4, 5)):
        chunk = -(-1024 // nsplit // 128) * 128
        ns = -(-1024 // chunk)
        out = torch.empty(b, 32, 128, dtype=q.dtype, device="cuda")
        acc = torch.empty(b, 32, ns, 128, dtype=torch.float32, device="cuda")
        mx = torch.empty(b, 32, ns, dtype=torch.float32, device="cuda")
        sm = torch.empty_like(mx)

        def run(bn=bn, w=w, st=st, ns=ns, chunk=chunk, out=out, acc=acc, mx=mx, sm=sm):
            _heads_kernel[(b, ns)](
                q, kc, vc, slots, lengths, out, acc, mx, sm,
                q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
                out.stride(0), out.stride(1), 128**-0.5, chunk, ns,
                HKV=4, G=8, BG=16, D=128, BN=bn, DIRECT=ns == 1, num_warps=w, num_stages=st,
            )  # fmt: skip
            if ns > 1:
                p2 = fd.triton_pow2(ns)
                fk.combine_kernel[(b, 32)](acc, mx, sm, out, out.stride(0), out.stride(1), 32, ns, p2, 128)
            return out

        try:
            out.fill_(float("nan"))
            err = float((run().float() - ref.float()).abs().max())
            us = graph_us(run)
        except Exception as exc:
            print(f"| {ns} | {bn} | {w} | {st} | failed: {type(exc).__name__} {str(exc)[:80]} | | |")
            continue
        print(f"| {ns} | {bn} | {w} | {st} | {us:.1f} | {nbytes / (us * 1e-6) / bw:.2f} | {err:.1e} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["flash", "prefetch", "heads"], default=None)
    args = ap.parse_args()
    bw = bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s")
    if args.only in (None, "prefetch"):
        prefetch(bw)
    if args.only in (None, "flash"):
        flash(bw)
    if args.only in (None, "heads"):
        heads(bw)


if __name__ == "__main__":
    main()
