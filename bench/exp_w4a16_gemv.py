"""Experiments on the W4A16 GEMMs at decode sizes (M = 1 GEMV, the Gluon tensor-core kernel), each against bf16
`x @ w.t()` and what `w4a16_linear` runs now, in CUDA graphs with 4 weight copies rotating beyond the L2.

    PYTHONPATH=. python bench/exp_w4a16_gemv.py [--quick]   # the GEMV's K loop pipelined (tl.range stages)
    PYTHONPATH=. python bench/exp_w4a16_gemv.py --ladder    # where the GEMV's time goes over a plain read
    PYTHONPATH=. python bench/exp_w4a16_gemv.py --mma-tiled # tensor cores on the row layout vs repacked tiles
    PYTHONPATH=. python bench/exp_w4a16_gemv.py --tiled-dispatch # w4a16_linear on repacked tiles, 1-256 rows
    PYTHONPATH=. python bench/exp_w4a16_gemv.py --tiled-sweep [--rows 1 64] # each kernel's tiles on them

The default mode: Triton pipelines loads that feed no dot only in a loop that carries its own num_stages, so
the GEMV's weight loads were never staged through shared memory (PREFETCH held one step ahead in registers);
it times the current default and tiles with S stages in flight, each checked against the fp32 reference.
The other modes are in `--help`; bench/RESULTS.md ("Quantized GEMMs") has what each measured.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from bench.quant import bench_graph, rel
from miles_core.kernels import w4a16_gemm, w4a16_mma
from miles_core.kernels.fp8_gemm import _cdiv, split_for
from miles_core.kernels.quant_triton import _load_words, _magic_join, _store_split
from miles_core.kernels.w4a16_gemm import W4A16Config
from miles_core.quant import int4_group_quantize, pack_int4


def weight_copies(n: int, k: int, copies: int = 4):
    """`copies` random N x K weights as (packed int4, group-major scales) and their bf16 dequantization:
    4 x 29 MB of int4 at 14336 x 4096, so the L2 never holds the next call's weights."""
    packed, wbs = [], []
    for _ in range(copies):
        q, sc = int4_group_quantize(torch.randn(n, k, device="cuda") * 0.02, 128)
        packed.append((pack_int4(q), w4a16_gemm.group_major(sc)))
        wbs.append(w4a16_gemm.dequantize_packed(*packed[-1], k, 128, torch.bfloat16))
    return packed, wbs


def gemv_setup(n: int, k: int):
    """`weight_copies`, one row of x, its fp32 reference output and bf16 `x @ w.t()`'s time in CUDA graphs."""
    packed, wbs = weight_copies(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ wbs[0].float().t()
    base = bench_graph([lambda wb=wb: x @ wb.t() for wb in wbs[:2]])
    return packed, wbs, x, ref, base


def occupancy(n: int, k: int) -> list[W4A16Config]:
    """Many small programs (high split-K): more warps per SM to issue the dequant and FMAs."""
    out = [w4a16_gemm.default_config(1, n, k)]
    kb = _cdiv(k, 256)
    splits = [s for s in (4, 8, 14, 16, 28, 56) if s <= kb]
    for bn, bk, warps in ((16, 256, 1), (32, 256, 1), (32, 128, 1), (64, 256, 2), (64, 128, 2), (32, 256, 2)):
        for split in splits:
            programs = _cdiv(n, bn) * split
            if not 1500 <= programs <= 8000 or split > _cdiv(k, bk):
                continue
            for stages in (1, 3):
                out.append(W4A16Config(bm=1, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=stages,
                                       unpack=4))  # fmt: skip
    return list(dict.fromkeys(out))


def long_rows(n: int, k: int) -> list[W4A16Config]:
    """Long contiguous stretches of each weight row per program (bk 512-2048: 256 B - 1 KB of a row per
    step, against 128 B at bk 256): whether the row-scattered 128-byte reads hold the GEMV at ~2 TB/s."""
    out = [w4a16_gemm.default_config(1, n, k)]
    for bk in (512, 1024, 2048):
        for bn in (4, 8, 16, 32):
            for warps in (1, 2, 4):
                per_thread = bn * bk // (32 * warps)
                if per_thread > 512 or per_thread < 64 or bk // 8 < 32 * warps // max(1, bn):
                    continue
                for target in (900, 3600):
                    split = split_for(_cdiv(n, bn), _cdiv(k, bk), target)
                    for prefetch in (False,):
                        out.append(W4A16Config(bm=1, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=1,
                                               unpack=4, prefetch=prefetch))  # fmt: skip
    return list(dict.fromkeys(out))


def candidates(n: int, k: int, quick: bool) -> list[W4A16Config]:
    out = [w4a16_gemm.default_config(1, n, k)]
    tiles = [(32, 1), (64, 1), (64, 2), (128, 2), (128, 4), (256, 4)]
    if quick:
        tiles = [(64, 1), (128, 4)]
    for bn, warps in tiles:
        for bk in (256, 512):
            if bk == 512 and bn * bk // (32 * warps) > 512:
                continue
            for stages in (2, 4):
                for target in (264, 1056):
                    split = split_for(_cdiv(n, bn), _cdiv(k, bk), target)
                    out.append(W4A16Config(bm=1, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=stages,
                                           unpack=4))  # fmt: skip
    return list(dict.fromkeys(out))


def probe() -> None:
    """Read-only probe: the packed weights read in [BN, BKW] word tiles (xor-summed, one int out per
    program) in CUDA graphs, against a flat read of the same bytes: does the tile shape alone cap the
    bandwidth?"""
    import triton
    import triton.language as tl

    @triton.jit
    def read_tiles(W, OUT, N, KW, stride_wn, kw_per_split, BN: tl.constexpr, BKW: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        w0 = tl.program_id(1) * kw_per_split
        acc = tl.zeros((BN, BKW), dtype=tl.int32)
        for at in range(w0, w0 + kw_per_split, BKW):
            words = at + tl.arange(0, BKW)
            mask = (cols[:, None] < N) & (words[None, :] < KW)
            acc ^= tl.load(W + cols[:, None] * stride_wn + words[None, :], mask=mask, other=0)
        tl.store(OUT + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.xor_sum(tl.xor_sum(acc, 1), 0))

    def call(w, out, bn, bkw, split, warps):
        n, kw = w.shape
        kwps = _cdiv(_cdiv(kw, bkw), split) * bkw
        return lambda: read_tiles[(_cdiv(n, bn), split)](w, out, n, kw, w.stride(0), kwps, BN=bn, BKW=bkw,
                                                           num_warps=warps)  # fmt: skip

    print("| probe shape | tile (BN x BKW words) | split | warps | us | GB/s |")
    print("|---|---|---|---|---|---|")
    tiles = [(64, 32, 4, 1), (32, 32, 8, 1), (8, 256, 1, 1), (8, 256, 2, 2), (4, 256, 2, 1), (16, 128, 2, 2),
             (1, 512, 1, 1), (2, 512, 1, 2), (64, 32, 1, 1), (128, 32, 4, 4)]  # fmt: skip
    for n, k in [(14336, 4096), (4096, 14336)]:
        kw = k // 8
        ws = [torch.randint(-(2**31), 2**31 - 1, (n, kw), device="cuda", dtype=torch.int32) for _ in range(4)]
        nbytes = n * kw * 4
        out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
        flat = bench_graph([lambda w=w: torch.bitwise_xor(w, 1, out=w) for w in ws[:2]])  # read + write
        print(f"| {n}x{k} | torch xor in place (read + write) | - | - | {flat:.1f} | {2 * nbytes / flat / 1e3:.0f} |")
        for bn, bkw, split, warps in tiles:
            us = bench_graph([call(w, out, bn, bkw, split, warps) for w in ws])
            print(f"| {n}x{k} | {bn} x {bkw} | {split} | {warps} | {us:.1f} | {nbytes / us / 1e3:.0f} |", flush=True)
        del ws
        torch.cuda.empty_cache()


MMA_TILES = {  # (bn, warps): at 32-64 rows, 16 columns per warp keep x, the accumulators and the weights in
    # registers (sm_90 compile: 190 registers at bn 64 / 4 warps, spills at 32 columns per warp)
    1: [(64, 4), (64, 2), (128, 4), (32, 2), (32, 1), (64, 1), (256, 4)],
    16: [(64, 4), (64, 2), (128, 4), (32, 2), (32, 1), (64, 1), (256, 4)],
    32: [(64, 2), (64, 4), (128, 4), (32, 1)],
    64: [(64, 4), (128, 8), (32, 2), (64, 2)],
}


def _time_row(head: str, calls, ref: torch.Tensor, base: float) -> None:
    """Print `head` + `calls`' time in a CUDA graph, its speed-up over `base` and its error against `ref` (the
    output poisoned first), or why it failed."""
    try:
        calls[0]().fill_(float("nan"))
        err = rel(calls[0](), ref)
        us = bench_graph(calls)
    except Exception as exc:
        print(f"{head} failed: {type(exc).__name__}: {str(exc)[:200]} |")
        return
    print(f"{head} {us:.1f} | {base:.1f} | {base / us:.2f}x | {err:.1e} |", flush=True)


def gluon_sweep(kernel, rows, configs, shapes=((14336, 4096), (4096, 14336))) -> None:
    """`kernel` (a `kernels.w4a16_mma` entry point) with each of `configs(m)` (keyword dicts) at each row count,
    against bf16 and what `w4a16_linear` runs now, checked against the fp32 reference (output poisoned first)."""
    print("| shape | M | kernel | us | bf16 us | speed-up | rel err |")
    print("|---|---|---|---|---|---|---|")
    for n, k in shapes:
        packed, wbs = weight_copies(n, k)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wbs[0].float().t()
            base = bench_graph([lambda wb=wb, x=x: x @ wb.t() for wb in wbs[:2]])
            cur = bench_graph([lambda p=p, sc=sc, x=x: w4a16_gemm.w4a16_linear(x, p, sc, 128) for p, sc in packed])
            err = rel(w4a16_gemm.w4a16_linear(x, *packed[0], 128), ref)
            print(f"| {n}x{k} | {m} | w4a16_linear now | {cur:.1f} | {base:.1f} | {base / cur:.2f}x | {err:.1e} |")
            for c in configs(m):
                split = split_for(_cdiv(n, c["bn"]), k // 128, c["target"])
                name = " ".join(f"{key} {val}" for key, val in c.items() if key != "target") + f" split {split}"
                run = [lambda p=p, sc=sc, x=x, c=c: kernel(x, p, sc, **c) for p, sc in packed]
                _time_row(f"| {n}x{k} | {m} | {name} |", run, ref, base)
        del packed, wbs
        torch.cuda.empty_cache()


def mma(rows=(1, 16, 32, 64)) -> None:
    """The Gluon tensor-core kernel (`kernels.w4a16_mma`), `MMA_TILES` x split targets 512-2048."""
    configs = lambda m: [dict(bn=bn, num_warps=nw, target=t) for bn, nw in MMA_TILES[m] for t in (512, 1024, 2048)]
    gluon_sweep(w4a16_mma.w4a16_mma, rows, configs)


def mma_tiled(rows=(1, 16)) -> None:
    """The Gluon tensor-core kernel on the weights as they are (each program reads bn runs of 64 bytes per group,
    one per weight row) and on `w4a16_mma.repack_tiles` (the same words as one contiguous bn x 64-byte block per
    column tile and group), `MMA_TILES` x split targets, against bf16 and `w4a16_linear` in the same run; at
    M = 1 also the GEMV (its default tiles) reading each repacked layout."""
    print("| shape | M | tile | split | rows layout us | repacked us | bf16 us | repacked speed-up | same bits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in ((14336, 4096), (4096, 14336)):
        packed, wbs = weight_copies(n, k)
        tiled = {bn: [w4a16_mma.repack_tiles(p, bn) for p, _ in packed] for bn in {bn for bn, _ in MMA_TILES[1]}}
        for m in rows:
            mma_tiled_rows(n, k, m, packed, wbs, tiled)
        del packed, wbs, tiled
        torch.cuda.empty_cache()


def mma_tiled_rows(n: int, k: int, m: int, packed, wbs, tiled) -> None:
    """`mma_tiled`'s rows for one shape and row count."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    base = bench_graph([lambda wb=wb: x @ wb.t() for wb in wbs[:2]])
    cur = bench_graph([lambda p=p, sc=sc: w4a16_gemm.w4a16_linear(x, p, sc, 128) for p, sc in packed])
    print(f"| {n}x{k} | {m} | w4a16_linear now | - | {cur:.1f} | - | {base:.1f} | {base / cur:.2f}x | - |")
    if m == 1:  # the GEMV (default tiles) reading the repacked layouts
        cfg = w4a16_gemm.default_config(1, n, k)
        want = w4a16_gemm.w4a16_linear_triton(x, *packed[0], 128, cfg)
        for bt, copies in tiled.items():
            run = [
                lambda t=t, sc=sc: w4a16_gemm.w4a16_linear_triton(x, t, sc, 128, cfg)
                for t, (_, sc) in zip(copies, packed, strict=True)
            ]
            same = torch.equal(run[0](), want)
            us = bench_graph(run)
            name = f"GEMV {cfg.bn} x {cfg.bk} on tiles of {bt}"
            print(f"| {n}x{k} | 1 | {name} | - | {cur:.1f} | {us:.1f} | {base:.1f} | {base / us:.2f}x | "
                  f"{'yes' if same else 'NO'} |", flush=True)  # fmt: skip
    for (bn, nw), target in itertools.product(MMA_TILES[1], (256, 512, 1024, 2048)):
        split = split_for(_cdiv(n, bn), k // 128, target)
        try:
            tile = dict(bn=bn, num_warps=nw, split_k=split)
            plain = [lambda p=p, sc=sc, c=tile: w4a16_mma.w4a16_mma(x, p, sc, **c) for p, sc in packed]
            reps = [
                lambda t=t, sc=sc, c=tile: w4a16_mma.w4a16_mma(x, t, sc, **c)
                for t, (_, sc) in zip(tiled[bn], packed, strict=True)
            ]
            same = torch.equal(plain[0](), reps[0]())
            us_rows, us_tiles = bench_graph(plain), bench_graph(reps)
        except Exception as exc:
            print(f"| {n}x{k} | {m} | bn {bn} warps {nw} | {split} | failed: {type(exc).__name__}: {str(exc)[:160]} |")
            continue
        print(f"| {n}x{k} | {m} | bn {bn} warps {nw} | {split} | {us_rows:.1f} | {us_tiles:.1f} | {base:.1f} | "
              f"{base / us_tiles:.2f}x | {'yes' if same else 'NO'} |", flush=True)  # fmt: skip


def tiled_dispatch(rows=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256), bts=(64, 32)) -> None:
    """`w4a16_linear` on the weights as they are and on `w4a16_mma.repack_tiles(packed, bt)` (its default kernel
    and tiles for each row count, the tensor-core kernel's bn taken from the tiles), against bf16 in the same
    run: whether one repacked copy serves every row count."""
    tiles = " | ".join(f"tiles of {bt} us" for bt in bts)
    print(f"| shape | M | bf16 us | rows layout us | {tiles} | same bits |")
    print("|---|---|---|---|" + "---|" * len(bts) + "---|")
    for n, k in ((14336, 4096), (4096, 14336)):
        packed, wbs = weight_copies(n, k)
        tiled = {bt: [w4a16_mma.repack_tiles(p, bt) for p, _ in packed] for bt in bts}
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = bench_graph([lambda x=x, wb=wb: x @ wb.t() for wb in wbs[:2]])
            plain = bench_graph([lambda x=x, p=p, sc=sc: w4a16_gemm.w4a16_linear(x, p, sc, 128) for p, sc in packed])
            want = w4a16_gemm.w4a16_linear(x, *packed[0], 128)
            cells, same = [], True
            for bt in bts:
                run = [
                    lambda x=x, t=t, sc=sc: w4a16_gemm.w4a16_linear(x, t, sc, 128)
                    for t, (_, sc) in zip(tiled[bt], packed, strict=True)
                ]
                same &= torch.equal(run[0](), want)
                us = bench_graph(run)
                cells.append(f"{us:.1f} ({base / us:.2f}x)")
            print(f"| {n}x{k} | {m} | {base:.1f} | {plain:.1f} ({base / plain:.2f}x) | {' | '.join(cells)} | "
                  f"{'yes' if same else 'NO'} |", flush=True)  # fmt: skip
        del packed, wbs, tiled
        torch.cuda.empty_cache()


def tiled_configs(n: int, k: int, m: int) -> list:
    """`tiled_sweep`'s candidates at m rows: W4A16Config (the Triton kernels) or dicts (the Gluon kernel)."""
    cfg = W4A16Config
    if m == 1:
        out = [w4a16_gemm.default_config(1, n, k)]
        for bn, bk, warps, pre, target in [
            (16, 2048, 4, False, 0), (16, 1024, 2, False, 0), (16, 1024, 4, False, 0), (32, 1024, 4, False, 0),
            (32, 2048, 4, False, 0), (32, 512, 2, False, 0), (64, 512, 4, False, 0), (64, 1024, 4, False, 0),
            (64, 256, 2, True, 1024), (32, 256, 1, True, 1024), (64, 128, 2, True, 1024), (64, 256, 4, True, 512),
            (16, 256, 1, True, 1024), (32, 512, 2, True, 512), (64, 128, 1, True, 2048), (64, 512, 4, True, 512),
        ]:  # fmt: skip
            split = split_for(_cdiv(n, bn), _cdiv(k, bk), target) if target else 1
            out.append(cfg(bm=1, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=1, unpack=4, prefetch=pre))
        return out
    if m <= 64:
        out = [w4a16_gemm.default_config(m, n, k)]
        for bn, bk, warps, stages, unpack, split in [
            (64, 128, 4, 4, 4, 1), (64, 128, 4, 4, 4, 2), (64, 128, 4, 4, 4, 4), (64, 256, 4, 3, 4, 1),
            (128, 128, 4, 3, 4, 1), (128, 128, 8, 3, 4, 1), (64, 128, 4, 3, 2, 1), (128, 128, 4, 3, 2, 2),
        ]:  # fmt: skip
            out.append(cfg(bm=64, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=stages, unpack=unpack))
        out += [dict(bn=64, num_warps=nw, target=t) for nw in (2, 4) for t in (256, 512, 1024)]
        return out
    out = [w4a16_gemm.default_config(m, n, k)]
    for bm, bn, bk, warps, stages, unpack, split, swap in [
        (128, 64, 128, 4, 3, 2, 2, False), (128, 64, 128, 4, 3, 2, 4, False), (64, 64, 128, 4, 3, 2, 2, False),
        (64, 128, 128, 4, 3, 2, 2, False), (64, 128, 128, 8, 3, 2, 1, False), (128, 128, 128, 8, 3, 2, 1, False),
        (128, 128, 128, 8, 3, 2, 2, False), (64, 128, 128, 4, 4, 4, 1, False), (128, 64, 128, 4, 4, 4, 2, False),
        (64, 128, 128, 4, 3, 2, 1, True), (128, 128, 128, 4, 3, 2, 2, True), (64, 64, 128, 4, 4, 2, 4, False),
    ]:  # fmt: skip
        out.append(cfg(bm=bm, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=stages, unpack=unpack,
                       swap=swap))  # fmt: skip
    return out


def _tiled_baselines(x, k: int, m: int, packed, tiled) -> list:
    """`tiled_sweep`'s reference rows: `w4a16_linear` on each layout, and at >= 128 rows dequantize + cuBLAS."""
    lin = w4a16_gemm.w4a16_linear
    named = [
        ("w4a16_linear, rows layout", [lambda p=p, sc=sc: lin(x, p, sc, 128) for p, sc in packed]),
        ("w4a16_linear, tiles", [lambda t=t, sc=sc: lin(x, t, sc, 128) for t, sc in tiled]),
    ]
    if m >= 128:
        deq = w4a16_gemm.dequantize_packed
        calls = [lambda p=p, sc=sc: x @ deq(p, sc, k, 128, torch.bfloat16).t() for p, sc in packed]
        named.append(("dequantize (torch) + cuBLAS", calls))
        fast = w4a16_gemm.dequantize_packed_triton
        calls = [lambda t=t, sc=sc: x @ fast(t, sc, k, 128, torch.bfloat16).t() for t, sc in tiled]
        named.append(("dequantize (Triton, tiles) + cuBLAS", calls))
    return named


def tiled_sweep(rows=(1, 48, 64, 128, 256), bt: int = 64) -> None:
    """Tile choices for each W4A16 kernel on `repack_tiles(packed, bt)`, against `w4a16_linear` on the rows
    layout and on the tiles (their defaults) and bf16 (and at >= 128 rows dequantize + cuBLAS), same run."""
    print("| shape | M | kernel on tiles | us | bf16 us | speed-up | rel err |")
    print("|---|---|---|---|---|---|---|")
    for n, k in ((14336, 4096), (4096, 14336)):
        packed, wbs = weight_copies(n, k)
        tiled = [(w4a16_mma.repack_tiles(p, bt), sc) for p, sc in packed]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wbs[0].float().t()
            base = bench_graph([lambda wb=wb, x=x: x @ wb.t() for wb in wbs[:2]])
            named = _tiled_baselines(x, k, m, packed, tiled)
            for c in tiled_configs(n, k, m):
                if isinstance(c, dict):
                    split = split_for(_cdiv(n, c["bn"]), k // 128, c["target"])
                    kw = dict(bn=c["bn"], num_warps=c["num_warps"], split_k=split)
                    name = f"mma bn {c['bn']} warps {c['num_warps']} split {split}"
                    named.append((name, [lambda t=t, sc=sc, x=x, kw=kw: w4a16_mma.w4a16_mma(x, t, sc, **kw)
                                         for t, sc in tiled]))  # fmt: skip
                else:
                    name = (f"bm {c.bm} bn {c.bn} bk {c.bk} split {c.split_k} warps {c.num_warps} st {c.num_stages} "
                            f"unpack {c.unpack}{' swap' if c.swap else ''}{' pre' if c.prefetch else ''}")  # fmt: skip
                    named.append((name, [lambda t=t, sc=sc, x=x, c=c: w4a16_gemm.w4a16_linear_triton(x, t, sc, 128, c)
                                         for t, sc in tiled]))  # fmt: skip
            for name, calls in named:
                _time_row(f"| {n}x{k} | {m} | {name} |", calls, ref, base)
        del packed, wbs, tiled
        torch.cuda.empty_cache()


def maxnreg() -> None:
    """The GEMV under a register cap (Triton's `maxnreg` launch option): Nsight Compute showed the M = 1
    GEMV at 13.9-14.5 us limited by occupancy (14336 x 4096: 128 registers, 4 blocks per SM, 1.7 waves;
    4096 x 14336: 167 registers, ~7 warps per SM), so: do more resident warps beat the spills?"""
    from miles_core.kernels import quant_triton

    plain = quant_triton.w4a16_gemv_kernel

    class Capped:
        def __init__(self, regs):
            self.regs = regs

        def __getitem__(self, grid):
            return lambda *a, **kw: plain[grid](*a, maxnreg=self.regs, **kw)

    print("| shape | config | maxnreg | us | bf16 us | speed-up | rel err |")
    print("|---|---|---|---|---|---|---|")
    for n, k in [(14336, 4096), (4096, 14336)]:
        packed, wbs, x, ref, base = gemv_setup(n, k)
        cfgs = [w4a16_gemm.default_config(1, n, k)]
        for bn, bk, warps, target in ((16, 2048, 4, 1), (16, 1024, 4, 1), (8, 2048, 4, 1), (16, 2048, 2, 1),
                                      (32, 256, 1, 1024), (32, 256, 1, 2048), (16, 512, 1, 2048)):  # fmt: skip
            split = split_for(_cdiv(n, bn), _cdiv(k, bk), target) if target > 1 else 1
            cfgs.append(W4A16Config(bm=1, bn=bn, bk=bk, split_k=split, num_warps=warps, num_stages=1, unpack=4,
                                    prefetch=bk == 256))  # fmt: skip
        for cfg in dict.fromkeys(cfgs):
            for regs in (None, 96, 80, 64, 48):
                quant_triton.w4a16_gemv_kernel = plain if regs is None else Capped(regs)
                try:
                    run = [
                        lambda p=p, sc=sc, c=cfg, x=x: w4a16_gemm.w4a16_linear(x, p, sc, 128, config=c)
                        for p, sc in packed
                    ]
                    y = run[0]()
                    y.fill_(float("nan"))
                    err = rel(run[0](), ref)
                    us = bench_graph(run)
                    print(f"| {n}x{k} | bn {cfg.bn} bk {cfg.bk} split {cfg.split_k} warps {cfg.num_warps} | {regs} | "
                          f"{us:.1f} | {base:.1f} | {base / us:.2f}x | {err:.1e} |", flush=True)  # fmt: skip
                except Exception as exc:
                    print(f"| {n}x{k} | {cfg} | {regs} | failed: {type(exc).__name__}: {str(exc)[:150]} |")
                finally:
                    quant_triton.w4a16_gemv_kernel = plain
        del packed, wbs
        torch.cuda.empty_cache()


@triton.jit
def ladder_kernel(
    X, W, S, Y, P, LOCKS, OUT, M, N, K, kb_per_split, stride_xm, stride_wn, stride_sn, stride_sg, stride_ym,
    GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    PREFETCH: tl.constexpr, LEVEL: tl.constexpr,
):  # fmt: skip
    pid_n, pid_k = tl.program_id(1), tl.program_id(2)
    cols = pid_n * BN + tl.arange(0, BN)
    k_words = (K + 7) // 8
    kb0 = pid_k * kb_per_split
    acc = tl.zeros((BN,), dtype=tl.float32)
    bits = tl.zeros((BN, BK // 8), dtype=tl.int32)
    if PREFETCH:
        wp = _load_words(W, cols, stride_wn, kb0 * BK, N, k_words, BK, EVEN_K)
    for it in range(0, kb_per_split):
        k0 = (kb0 + it) * BK
        if PREFETCH:
            cur = wp
            wp = _load_words(W, cols, stride_wn, k0 + BK, N, k_words, BK, EVEN_K, it + 1 < kb_per_split)
        else:
            cur = _load_words(W, cols, stride_wn, k0, N, k_words, BK, EVEN_K)
        if LEVEL == 0:
            bits ^= cur
        else:
            w = _magic_join(cur, False, True)  # [BN, BK] fp32, 136 + q
            if LEVEL == 1:
                acc += tl.sum(w, axis=1)
            else:
                ks = k0 + tl.arange(0, BK)
                x = tl.load(X + ks, mask=(ks < K) | EVEN_K, other=0.0).to(tl.float32)
                if LEVEL == 2:
                    acc += tl.sum(w * x[None, :], axis=1)
                elif BK <= GROUP:
                    s = tl.load(S + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=cols < N, other=0.0)
                    acc += (tl.sum(w * x[None, :], axis=1) - 136.0 * tl.sum(x)) * s.to(tl.float32)
                else:
                    g = k0 // GROUP + tl.arange(0, BK // GROUP)
                    s = tl.load(S + cols[:, None] * stride_sn + g[None, :] * stride_sg, mask=cols[:, None] < N)
                    part = tl.sum(tl.reshape(w * x[None, :], (BN, BK // GROUP, GROUP)), axis=2)
                    xs = tl.sum(tl.reshape(x, (BK // GROUP, GROUP)), axis=1)
                    acc += tl.sum((part - 136.0 * xs[None, :]) * s.to(tl.float32), axis=1)
    if LEVEL == 0:
        tl.store(OUT + pid_k * N + cols, tl.xor_sum(bits, 1).to(tl.float32), mask=cols < N)
    elif LEVEL < 4:
        tl.store(OUT + pid_k * N + cols, acc, mask=cols < N)
    else:
        _store_split(acc[None, :], Y, P, LOCKS, tl.arange(0, 1), cols, M, N, stride_ym, SPLIT_K)


LADDER = [
    "read: words xor-summed (the probe, on the GEMV's tile and grid)",
    "+ dequant: magic-number fp32 weights summed per row",
    "+ x: the weights times x, summed per row",
    "+ groups and scales: per-group sums times the group scales (the GEMV's math)",
    "+ split-K store (the GEMV itself, a copy)",
]


def ladder() -> None:
    """Where the M = 1 GEMV's ~5 us over a plain read of its weights goes: one kernel on the default tile and
    grid of each shape with its work added one piece at a time (LADDER), against the real GEMV and bf16 in the
    same run (CUDA graphs, 4 weight copies beyond the L2). Levels 0-3 store one value per program and column
    (xor or sum), so nothing the loads feed is dead code."""
    print("| shape | level | us | bf16 us | speed-up |")
    print("|---|---|---|---|---|")
    for n, k in [(14336, 4096), (4096, 14336)]:
        ladder_shape(n, k)
        torch.cuda.empty_cache()


def ladder_shape(n: int, k: int) -> None:
    """`ladder`'s rows for one N x K shape."""
    from miles_core.kernels.fp8_gemm import tile_locks

    packed, _, x, ref, base = gemv_setup(n, k)
    cfg = w4a16_gemm.default_config(1, n, k)
    grid = (1, _cdiv(n, cfg.bn), cfg.split_k)
    out = torch.empty(cfg.split_k, n, device="cuda")
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    partials = torch.empty(cfg.split_k, 1, n, device="cuda")
    locks = tile_locks(x.device, grid[1])

    def call(p, sc, level):
        ladder_kernel[grid](
            x, p, sc, y, partials, locks, out, 1, n, k, _cdiv(_cdiv(k, cfg.bk), cfg.split_k), x.stride(0),
            p.stride(0), sc.stride(0), sc.stride(1), y.stride(0), GROUP=128, BN=cfg.bn, BK=cfg.bk,
            SPLIT_K=cfg.split_k, EVEN_K=k % (cfg.bk * cfg.split_k) == 0, PREFETCH=cfg.prefetch, LEVEL=level,
            num_warps=cfg.num_warps, num_stages=1,
        )  # fmt: skip

    real = bench_graph([lambda p=p, sc=sc: w4a16_gemm.w4a16_linear(x, p, sc, 128) for p, sc in packed])
    print(f"| {n}x{k} {cfg} | w4a16_linear | {real:.1f} | {base:.1f} | {base / real:.2f}x |", flush=True)
    for level, what in enumerate(LADDER):
        y.fill_(float("nan"))
        call(*packed[0], level)
        if level == 4:
            assert rel(y, ref) < 1e-2, rel(y, ref)
        us = bench_graph([lambda p=p, sc=sc, lv=level: call(p, sc, lv) for p, sc in packed])
        print(f"| {n}x{k} | {level}: {what} | {us:.1f} | {base:.1f} | {base / us:.2f}x |", flush=True)


def profile_once() -> None:
    """Each default kernel (M = 1 GEMV, M = 16 MMA) three times, no graphs: a
    target for Nsight Compute, e.g. `ncu --clock-control none -k regex:w4a16 --launch-skip 2 --section SpeedOfLight
    --section WarpStateStats --section Occupancy python bench/exp_w4a16_gemv.py --profile-once`."""
    for n, k in [(14336, 4096), (4096, 14336)]:
        q, sc = int4_group_quantize(torch.randn(n, k, device="cuda") * 0.02, 128)
        p, sc = pack_int4(q), w4a16_gemm.group_major(sc)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                w4a16_gemm.w4a16_linear(x, p, sc, 128)
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few tiles only")
    ap.add_argument("--occupancy", action="store_true", help="high split-K, small programs instead")
    ap.add_argument("--long", action="store_true", help="long contiguous row stretches per program instead")
    ap.add_argument("--probe", action="store_true", help="also time plain reads of the packed weights by tile shape")
    ap.add_argument("--mma", action="store_true", help="the Gluon tensor-core kernel only")
    ap.add_argument("--mma-tiled", action="store_true", help="the tensor-core kernel on repacked weight tiles")
    ap.add_argument("--tiled-dispatch", action="store_true", help="w4a16_linear on repacked tiles, 1-256 rows")
    ap.add_argument("--tiled-sweep", action="store_true", help="tile choices of each kernel on repacked tiles")
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="--tiled-sweep's row counts")
    ap.add_argument("--ladder", action="store_true", help="the GEMV's work added piece by piece over a plain read")
    ap.add_argument("--maxnreg", action="store_true", help="the GEMV under register caps instead")
    ap.add_argument("--profile-once", action="store_true", help="run each default kernel 3 times (for ncu)")
    args = ap.parse_args()
    if args.ladder:
        ladder()
        return
    if args.tiled_sweep:
        tiled_sweep(*(args.rows and [tuple(args.rows)] or []))
        return
    if args.tiled_dispatch:
        tiled_dispatch()
        return
    if args.mma_tiled:
        mma_tiled()
        return
    if args.maxnreg:
        maxnreg()
        return
    if args.profile_once:
        profile_once()
        return
    if args.mma:
        mma()
        return
    if args.probe:
        probe()
    print(f"device: {torch.cuda.get_device_name()}")
    print("| shape (N x K) | config | us | bf16 us | speed-up | rel err |")
    print("|---|---|---|---|---|---|")
    for n, k in [(14336, 4096), (4096, 14336)]:
        packed, wbs, x, ref, base = gemv_setup(n, k)
        results = []
        configs = occupancy(n, k) if args.occupancy else long_rows(n, k) if args.long else candidates(n, k, args.quick)
        for c in configs:
            try:
                err = rel(w4a16_gemm.w4a16_linear(x, *packed[0], 128, config=c), ref)
                us = bench_graph(
                    [lambda p=p, sc=sc, c=c, x=x: w4a16_gemm.w4a16_linear(x, p, sc, 128, config=c) for p, sc in packed]
                )
            except Exception as exc:  # a tile the compiler refuses (shared memory, registers)
                print(f"| {n}x{k} | {c} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |", flush=True)
                continue
            results.append((us, c))
            note = (
                f"bn {c.bn} bk {c.bk} split {c.split_k} warps {c.num_warps} stages {c.num_stages}"
                f"{' prefetch' if c.prefetch else ''}"
            )
            print(f"| {n}x{k} | {note} | {us:.1f} | {base:.1f} | {base / us:.2f}x | {err:.1e} |", flush=True)
        best = min(results, key=lambda r: r[0])
        print(f"best {n}x{k}: {best[0]:.1f} us {best[1]}", flush=True)
        del packed, wbs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
