"""(Experiment, removed after its run.) Device experiment (session 7): (A) is the W4A16 M=1 GEMV bound by its dequant ALU work?
(B) FP8 dense decode GEMMs at M=64 for the fused q/k/v and o_proj shapes, on pre-quantized rows."""
import sys
from dataclasses import replace

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from bench.quant import bench_graph, rel  # noqa: E402
from miles_core.kernels import fp8_gemm, w4a16_gemm  # noqa: E402
from miles_core.kernels.fp8_gemm import Fp8Config, _cdiv, split_for, tile_locks  # noqa: E402
from miles_core.kernels.quant_triton import _load_words, _magic_join, _store_split  # noqa: E402
from miles_core.quant import fp8_block_quantize, int4_group_quantize, pack_int4  # noqa: E402
from miles_core.quant.fp8 import ACT_EPS, BLOCK  # noqa: E402

_FAKE = tl.constexpr("""lop3.b32 $0, $8, 0xF, 0x43000000, 0xea; lop3.b32 $1, $8, 0xF0, 0x43000000, 0xea;
lop3.b32 $2, $8, 0xF00, 0x43000000, 0xea; lop3.b32 $3, $8, 0xF000, 0x43000000, 0xea;
lop3.b32 $4, $8, 0xF0000, 0x43000000, 0xea; lop3.b32 $5, $8, 0xF00000, 0x43000000, 0xea;
lop3.b32 $6, $8, 0xF000000, 0x43000000, 0xea; lop3.b32 $7, $8, 0xF0000000, 0x43000000, 0xea;""")


@triton.jit
def _fake_join(wp, DQ: tl.constexpr):
    if DQ == 1:
        h = tl.inline_asm_elementwise(_FAKE, "=r,=r,=r,=r,=r,=r,=r,=r,r", [wp], (tl.int32,) * 8, True, 1)
        f = tl.float32
        lo = tl.join(tl.join(h[0].to(f, bitcast=True), h[4].to(f, bitcast=True)), tl.join(h[2].to(f, bitcast=True), h[6].to(f, bitcast=True)))
        hi = tl.join(tl.join(h[1].to(f, bitcast=True), h[5].to(f, bitcast=True)), tl.join(h[3].to(f, bitcast=True), h[7].to(f, bitcast=True)))
    else:
        f = wp.to(tl.float32, bitcast=True)
        lo = tl.join(tl.join(f, f + 1.0), tl.join(f + 2.0, f + 3.0))
        hi = tl.join(tl.join(f + 4.0, f + 5.0), tl.join(f + 6.0, f + 7.0))
    return tl.reshape(tl.join(lo, hi), (wp.shape[0], wp.shape[1] * 8))


@triton.jit
def gemv_diag(X, W, S, Y, P, LOCKS, M, N, K, kb_per_split, stride_xm, stride_wn, stride_sn, stride_sg, stride_ym,
              GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
              EVEN_K: tl.constexpr, PREFETCH: tl.constexpr, DQ: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BN + tl.arange(0, BN)
    k_words = (K + 7) // 8
    kb0 = pid_k * kb_per_split
    acc = tl.zeros((BN,), dtype=tl.float32)
    if PREFETCH:
        wp = _load_words(W, cols, stride_wn, kb0 * BK, N, k_words, BK, EVEN_K)
    for it in range(0, kb_per_split):
        k0 = (kb0 + it) * BK
        if PREFETCH:
            cur = wp
            wp = _load_words(W, cols, stride_wn, k0 + BK, N, k_words, BK, EVEN_K, it + 1 < kb_per_split)
        else:
            cur = _load_words(W, cols, stride_wn, k0, N, k_words, BK, EVEN_K)
        ks = k0 + tl.arange(0, BK)
        x = tl.load(X + pid_m * stride_xm + ks, mask=(ks < K) | EVEN_K, other=0.0).to(tl.float32)
        if DQ == 0:
            w = _magic_join(cur, False, True)
        else:
            w = _fake_join(cur, DQ)
        g = k0 // GROUP + tl.arange(0, BK // GROUP)
        smask = (cols[:, None] < N) & (g[None, :] * GROUP < K)
        s = tl.load(S + cols[:, None] * stride_sn + g[None, :] * stride_sg, mask=smask, other=0.0)
        part = tl.sum(tl.reshape(w * x[None, :], (BN, BK // GROUP, GROUP)), axis=2)
        xs = tl.sum(tl.reshape(x, (BK // GROUP, GROUP)), axis=1)
        acc += tl.sum((part - 136.0 * xs[None, :]) * s.to(tl.float32), axis=1)
    rows = pid_m + tl.arange(0, 1)
    _store_split(acc[None, :], Y, P, LOCKS, rows, cols, M, N, stride_ym, SPLIT_K)


def gemv(x2, packed, scale, cfg, dq):
    m, k = x2.shape
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (m, _cdiv(n, cfg.bn), cfg.split_k)
    partials = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x2.device)
    locks = tile_locks(x2.device, grid[0] * grid[1])
    gemv_diag[grid](x2, packed, scale, y, partials, locks, m, n, k, _cdiv(_cdiv(k, cfg.bk), cfg.split_k),
                    x2.stride(0), packed.stride(0), scale.stride(0), scale.stride(1), y.stride(0),
                    GROUP=128, BN=cfg.bn, BK=cfg.bk, SPLIT_K=cfg.split_k, EVEN_K=k % (cfg.bk * cfg.split_k) == 0,
                    PREFETCH=cfg.prefetch, DQ=dq, num_warps=cfg.num_warps, num_stages=1)
    return y


ROWS = []


def row(what, shape, base, t, err="", note=""):
    ROWS.append((what, shape, base, t, base / t, err, note))
    print(f"{what:55s} {shape:22s} bf16 {base:7.1f} us  {t:7.1f} us  {base / t:5.2f}x  {err} {note}", flush=True)


def part_a():
    for n, k in [(14336, 4096), (4096, 14336)]:
        copies = 4
        ws = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(copies)]
        qs = [int4_group_quantize(w, 128) for w in ws]
        packed = [(pack_int4(q), w4a16_gemm.group_major(sc)) for q, sc in qs]
        wbs = [w4a16_gemm.dequantize_packed(p, sc, k, 128, torch.bfloat16) for p, sc in packed]
        del ws, qs
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        base = bench_graph([lambda wb=wb: x @ wb.t() for wb in wbs[:2]])
        ref = x.float() @ wbs[0].float().t()
        cfg = w4a16_gemm.default_config(1, n, k)
        t = bench_graph([lambda p=p, sc=sc: w4a16_gemm.w4a16_linear(x, p, sc, 128) for p, sc in packed])
        row("w4a16 M=1 current", f"{n}x{k}", base, t, f"{rel(w4a16_gemm.w4a16_linear(x, *packed[0], 128), ref):.1e}", str(cfg))
        for bn, bk, split, warps, pf in [(cfg.bn, cfg.bk, cfg.split_k, 1, cfg.prefetch), (64, 256, cfg.split_k, 2, cfg.prefetch),
                                         (128, 256, max(1, cfg.split_k // 2), 2, cfg.prefetch), (64, 512, max(1, cfg.split_k // 2), 1, False)]:
            c = replace(cfg, bn=bn, bk=bk, split_k=split, num_warps=warps, prefetch=pf)
            for dq in (0, 1, 2):
                try:
                    y = gemv(x, *packed[0], c, dq)
                    err = f"{rel(y, ref):.1e}" if dq == 0 else "-"
                    t = bench_graph([lambda p=p, sc=sc: gemv(x, p, sc, c, dq) for p, sc in packed])
                    row(f"w4a16 M=1 diag dq={dq} ({'real' if dq == 0 else 'lop3 only' if dq == 1 else 'no dequant'})",
                        f"{n}x{k}", base, t, err, f"bn={bn} bk={bk} split={split} warps={warps} pf={pf}")
                except Exception as ex:
                    print("!!", dq, bn, bk, type(ex).__name__, str(ex)[:300], flush=True)
        del packed, wbs
        torch.cuda.empty_cache()


def dense_pre(a, sa, w, s, cfg, m, n, k):
    y = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    kb_per_split = _cdiv(_cdiv(k, BLOCK), cfg.split_k)
    grid = (_cdiv(m, cfg.bm), _cdiv(n, cfg.bn), cfg.split_k)
    if cfg.split_k > 1:
        partials = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=a.device)
        locks = tile_locks(a.device, grid[0] * grid[1])
    else:
        partials, locks = y, y
    fp8_gemm.load_triton_kernels().fp8_dense_kernel[grid](
        a, sa, w, s, y, partials, locks, m, n, k, kb_per_split,
        a.stride(0), sa.stride(0), w.stride(0), s.stride(0), y.stride(0), ACT_EPS,
        BM=cfg.bm, BN=cfg.bn, BK=BLOCK, SPLIT_K=cfg.split_k, EVEN_K=k % BLOCK == 0, QUANT=False, SWAP=cfg.swap,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def part_b():
    m = 64
    for name, n, k in [("qkv fused", 5120, 2048), ("o_proj", 2048, 4096)]:
        copies = max(2, (256 << 20) // (n * k))
        quant, wbs = [], []
        for _ in range(copies):
            w = torch.randn(n, k, device="cuda") * 0.02
            quant.append(fp8_block_quantize(w))
            wbs.append(w.bfloat16())
        reps = max(1, 400 // copies)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        base = bench_graph([lambda wb=wb: x @ wb.t() for wb in wbs], reps)
        ref = fp8_gemm.fp8_linear_reference(x.float(), *quant[0])
        a, sa = fp8_gemm.fp8_act_quant_triton(x)
        t = bench_graph([lambda: fp8_gemm.fp8_act_quant_triton(x)], reps)
        row("act-quant alone", f"{name} {n}x{k}", base, t)
        cfg = fp8_gemm.dense_fp8_config(m, n, k)
        t = bench_graph([lambda q=q: fp8_gemm.fp8_dense_triton(x, *q, cfg) for q in quant], reps)
        row("dense: act-quant + triton (fp8 engine now)", f"{name} {n}x{k}", base, t, f"{rel(fp8_gemm.fp8_dense_triton(x, *quant[0], cfg), ref):.1e}", str(cfg))
        cands = []
        for bm, bn, warps, swap in [(64, 128, 8, False), (64, 64, 4, False), (16, 64, 4, True), (16, 128, 4, True), (32, 64, 4, True)]:
            for split in (1, 2, 4, 8):
                for st in (3, 4):
                    cands.append(Fp8Config(bm=bm, bn=bn, num_warps=warps, num_stages=st, split_k=split, swap=swap))
        res = []
        for c in cands:
            if _cdiv(k, 128) < 2 * c.split_k:
                continue
            try:
                y = dense_pre(a, sa, *quant[0], c, m, n, k)
                t = bench_graph([lambda q=q: dense_pre(a, sa, *q, c, m, n, k) for q in quant], reps)
                res.append((t, c, rel(y, ref)))
            except Exception as ex:
                print("!!", c, type(ex).__name__, str(ex)[:200], flush=True)
        res.sort(key=lambda r: r[0])
        for t, c, err in res[:6]:
            row("dense triton on fp8 rows (sweep best)", f"{name} {n}x{k}", base, t, f"{err:.1e}",
                f"bm={c.bm} bn={c.bn} w={c.num_warps} st={c.num_stages} split={c.split_k} swap={c.swap}")
        cnt = torch.tensor([m], device="cuda", dtype=torch.int32)
        for bn in (64, 128):
            y = fp8_gemm.grouped_fp8_linear_triton(a, quant[0][0][None], quant[0][1][None], cnt, 16, bn, 4, 3, swap=True, x_scale=sa, out_dtype=torch.bfloat16)
            t = bench_graph([lambda q=q: fp8_gemm.grouped_fp8_linear_triton(a, q[0][None], q[1][None], cnt, 16, bn, 4, 3, swap=True, x_scale=sa, out_dtype=torch.bfloat16) for q in quant], reps)
            row(f"grouped kernel as dense (16-row swap, bn {bn})", f"{name} {n}x{k}", base, t, f"{rel(y, ref):.1e}")
        del quant, wbs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    which = sys.argv[1] if len(sys.argv) > 1 else "ab"
    if "a" in which:
        part_a()
    if "b" in which:
        part_b()
    print("\n| what | shape | bf16 us | us | speed-up | rel err | note |\n|---|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f}x | {r[5]} | {r[6]} |")
