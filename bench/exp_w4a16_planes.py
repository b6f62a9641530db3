# ruff: noqa  (a throwaway measurement script, reverted in the next commit)
"""Experiment (reverted after measuring): W4A16 on byte planes vs the current kernels and bf16 (CUDA graphs).
`PYTHONPATH=. python bench/exp_w4a16_planes.py` on the device."""

import itertools

import torch

from bench.quant import bench_graph, rel
from miles_core.kernels import w4a16_gemm
from miles_core.kernels.fp8_gemm import _cdiv, load_triton_kernels, split_for, tile_locks
from miles_core.quant import int4_group_quantize, pack_int4

K = load_triton_kernels()


def planes(x, p8, sc, bm, bn, split, swap, woff, warps=4, stages=3, prefetch=True):
    m, k = x.shape
    n = p8.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (_cdiv(m, bm), _cdiv(n, bn), split)
    if split > 1:
        P = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        L = tile_locks(x.device, grid[0] * grid[1])
    else:
        P, L = y, y
    K.w4a16_planes_kernel[grid](
        x,
        p8,
        sc,
        y,
        P,
        L,
        m,
        n,
        k,
        _cdiv(_cdiv(k, 128), split),
        x.stride(0),
        p8.stride(0),
        sc.stride(0),
        sc.stride(1),
        y.stride(0),
        GROUP=128,
        BM=bm,
        BN=bn,
        BK=128,
        SPLIT_K=split,
        SWAP=swap,
        FP16=False,
        W_OFFSET=woff,
        EVEN_K=k % (128 * split) == 0,
        PREFETCH=prefetch,
        num_warps=warps,
        num_stages=stages,
    )
    return y


print("| shape | M | variant | us | vs bf16 | rel err |")
print("|---|---|---|---|---|---|")
for n, k in [(14336, 4096), (4096, 14336)]:
    copies = 4
    ws = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(copies)]
    qs = [int4_group_quantize(w, 128) for w in ws]
    packed = [(pack_int4(q), w4a16_gemm.group_major(sc)) for q, sc in qs]
    wbs = [w4a16_gemm.dequantize_packed(p, sc, k, 128, torch.bfloat16) for p, sc in packed]
    del ws, qs
    for m in (1, 16, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        base = bench_graph([lambda wb=wb: x @ wb.t() for wb in wbs[:2]])
        ref = x.float() @ wbs[0].float().t()
        print(f"| {n}x{k} | {m} | bf16 | {base:.1f} | 1.00x | |", flush=True)
        c = w4a16_gemm.default_config(m, n, k)
        err = rel(w4a16_gemm.w4a16_linear(x, *packed[0], 128, config=c), ref)
        t = bench_graph([lambda p=p, sc=sc: w4a16_gemm.w4a16_linear(x, p, sc, 128, config=c) for p, sc in packed])
        print(f"| {n}x{k} | {m} | current default | {t:.1f} | {base / t:.2f}x | {err:.1e} |", flush=True)
        best = None
        bms = (16,) if m <= 16 else (16, 64)
        for bm, bn, swap, woff in itertools.product(bms, (64, 128), (True, False), (False, True)):
            if bm == 64 and swap:
                continue
            s0 = split_for(_cdiv(m, bm) * _cdiv(n, bn), _cdiv(k, 128), 900)
            for split in sorted({max(1, s0 // 2), s0, s0 * 2}):
                if _cdiv(k, 128) < split:
                    continue
                try:
                    p8s = [(p.view(torch.uint8), sc) for p, sc in packed]
                    err = rel(planes(x, p8s[0][0], p8s[0][1], bm, bn, split, swap, woff), ref)
                    t = bench_graph(
                        [lambda p8=p8, sc=sc: planes(x, p8, sc, bm, bn, split, swap, woff) for p8, sc in p8s]
                    )
                except Exception as exc:
                    print(
                        f"| {n}x{k} | {m} | planes {bm}x{bn} swap {swap} woff {woff} split {split} | failed {type(exc).__name__} {str(exc)[:60]} | | |"
                    )
                    continue
                tag = f"planes {bm}x{bn} swap {swap} woff {woff} split {split}"
                if best is None or t < best[0]:
                    best = (t, tag)
                print(f"| {n}x{k} | {m} | {tag} | {t:.1f} | {base / t:.2f}x | {err:.1e} |", flush=True)
        print(f"| {n}x{k} | {m} | **best planes: {best[1]}** | {best[0]:.1f} | {base / best[0]:.2f}x | |", flush=True)
