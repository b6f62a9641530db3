# ruff: noqa: B023 (each lambda is timed at once, inside its loop iteration)
"""Quantized GEMMs against bf16, on the GPU, with the baselines measured in the same run.

    PYTHONPATH=. python bench/quant.py                        # eager tables (about 2 minutes on an H100)
    PYTHONPATH=. python bench/quant.py --only graph           # decode sizes in CUDA graphs, default tiles
    PYTHONPATH=. python bench/quant.py --only graph --sweep   # the tile sweeps behind default_config
    PYTHONPATH=. python bench/quant.py --only decode          # FP8 / W4A16 at the rollout decode step's
                                                              # sizes in CUDA graphs, new vs previous path
    PYTHONPATH=. python bench/quant.py --only decode --sweep  # + tile candidates of the decode kernels
    PYTHONPATH=. python bench/quant.py --only prefill --sweep # grouped FP8 at rollout-prefill sizes

Rows (median of triton.testing.do_bench, which flushes L2 before each repetition):
- FP8 block-scaled linear (Triton 1x128 act-quant + cuBLAS 1x128 x 128x128 `scaled_mm`) vs bf16
  `x @ w.t()`, on large GEMMs; also the cuBLAS call alone (activations pre-quantized) and cuBLAS's
  per-tensor / row-wise recipes and options on the same operands (its ceilings on this device).
- W4A16 (Triton, in-kernel dequant) vs bf16 on 14336x4096 and 4096x14336 weights at M=1..256.
- Grouped experts: Triton grouped FP8 and grouped W4A16 vs bf16 `torch._grouped_mm`.
- `--only graph`: the decode sizes again, each timed inside a CUDA graph (as a decode engine runs
  them), which takes the Python launch overhead (wrapper + Triton launcher, tens of us) out of the
  numbers; weights rotate over copies that together exceed the 50 MB L2.
- `--only decode`: the rollout decode step's GEMMs (batch 64, Qwen3-30B-A3B) in CUDA graphs. Dense
  projections at M = 64 (q 4096x2048, o 2048x4096, k/v 512x2048): bf16, act-quant + cuBLAS (the
  previous FP8 path), act-quant + the Triton dense kernel, and the fused dense kernel (the default
  now); grouped experts: the previous FP8 path (act-quant + `expert_tiles` prep + kernel), the
  in-kernel tile map, the fused kernels, and W4A16 with and without the prep, against bf16
  `torch._grouped_mm`. "bitwise" notes say whether a fused output equals its two-kernel output.
Every timed kernel is first checked against the reference (relative error printed).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch
from triton.testing import do_bench

from miles_core import kernels
from miles_core.kernels import fp8_gemm, w4a16_gemm, w4a16_mma
from miles_core.kernels.fp8_gemm import Fp8Config
from miles_core.kernels.w4a16_gemm import W4A16Config
from miles_core.quant import fp8_block_quantize, int4_group_quantize, pack_int4

ROWS: list[tuple] = []


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


GRAPH_REPS = 20


def bench_graph(calls, reps: int = GRAPH_REPS) -> float:
    """us per call: `calls` (closures over different weight copies) replayed `reps` times in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, cuBLAS workspaces) off the capture
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for c in calls:
                c()
    torch.cuda.synchronize()
    return do_bench(graph.replay, warmup=5, rep=50, return_mode="median") * 1e3 / (reps * len(calls))


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def row(group, shape, base_us, us, err, note=""):
    ROWS.append((group, shape, base_us, us, base_us / us, err, note))
    speed = f"bf16 {base_us:9.1f} us  quant {us:9.1f} us  {base_us / us:5.2f}x"
    print(f"  {group:<22} {shape:<28} {speed}  err {err:.1e} {note}", flush=True)


ACT_QUANT_SWEEP = [(bm, w, kf) for bm in (16, 32, 64) for w in (4, 8) for kf in (False, True)]


def _act_quant_rows(x, a, sa, m: int, k: int, sweep: bool) -> tuple:
    """The activation quantization alone (the default tiles, and with --sweep the candidates), as bandwidth:
    x read, e4m3 + scales written; each candidate's bits checked against the default's. -> the fastest tiles."""
    nbytes = m * k * 3 + m * (k // 128) * 4
    default = fp8_gemm.act_quant_tiles(m)
    best = None
    for tiles in [default] + (ACT_QUANT_SWEEP if sweep else []):
        fn = lambda tiles=tiles: fp8_gemm.fp8_act_quant_triton(x, 4, True, tiles=tiles)
        q, s = fn()
        same = torch.equal(q.view(torch.uint8), a.view(torch.uint8)) and torch.equal(s, sa)
        t = bench(fn)
        note = f"{nbytes / t / 1e3:.0f} GB/s, tiles {tiles}{' (default)' if tiles == default else ''}, same bits {same}"
        row("fp8 act-quant", f"{m}x{k}", float("nan"), t, 0.0, note)
        best = (t, tiles) if best is None else min(best, (t, tiles))
    return best[1]


def fp8_dense(sweep: bool = False):
    for m, n, k in [(8192, 8192, 8192), (4096, 14336, 4096), (4096, 4096, 14336), (16384, 7168, 2048)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") * 0.02
        wq, ws = fp8_block_quantize(w)
        wb = w.bfloat16()
        sb = fp8_gemm.prepare_weight_scale(ws)
        y = fp8_gemm.fp8_linear(x, wq, ws, scale_b=sb)
        ref = fp8_gemm.fp8_linear_reference(x.float(), wq, ws)  # same act-quant recipe, fp32 products
        err = rel(y, ref)
        base = bench(lambda: x @ wb.t())
        t = bench(lambda: fp8_gemm.fp8_linear(x, wq, ws, scale_b=sb))
        tflops = 2 * m * n * k / t / 1e6
        row("fp8 linear", f"{m}x{n}x{k}", base, t, err, f"{tflops:.0f} TFLOP/s")
        t3 = bench(lambda: fp8_gemm.fp8_linear(x, wq, ws, backend="triton"))
        err3 = rel(fp8_gemm.fp8_linear(x, wq, ws, backend="triton"), ref)
        row("fp8 linear (triton)", f"{m}x{n}x{k}", base, t3, err3, f"{2 * m * n * k / t3 / 1e6:.0f} TFLOP/s")
        a, sa = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)
        best = _act_quant_rows(x, a, sa, m, k, sweep)
        if best != fp8_gemm.act_quant_tiles(m):  # the whole linear with the fastest act-quant tiles
            default, fp8_gemm.act_quant_tiles = fp8_gemm.act_quant_tiles, lambda _m, best=best: best
            t5 = bench(lambda: fp8_gemm.fp8_linear(x, wq, ws, scale_b=sb))
            fp8_gemm.act_quant_tiles = default
            row("fp8 linear", f"{m}x{n}x{k}", base, t5, err, f"{2 * m * n * k / t5 / 1e6:.0f} TFLOP/s act-quant {best}")
        t2 = bench(lambda: fp8_gemm._scaled_mm(a, wq.t(), sa, sb, torch.bfloat16))
        row("fp8 scaled_mm alone", f"{m}x{n}x{k}", base, t2, err, f"{2 * m * n * k / t2 / 1e6:.0f} TFLOP/s")
        for name, fn in _scaled_mm_variants(a, wq, sa, sb).items():  # cuBLAS's other recipes: its ceilings here
            try:
                t4 = bench(fn)
            except Exception as ex:  # a recipe this torch / cuBLAS does not take is said, not hidden
                print(f"    {name}: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                continue
            row(f"cuBLAS {name}", f"{m}x{n}x{k}", base, t4, float("nan"), f"{2 * m * n * k / t4 / 1e6:.0f} TFLOP/s")


def _scaled_mm_variants(a, wq, sa, sb) -> dict:
    """Same operands through the other FP8 recipes and options (scales all ones: timing only)."""
    import torch.nn.functional as F

    m, n = a.shape[0], wq.shape[0]
    one = torch.ones((), device="cuda")
    ra, rb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    bf = torch.bfloat16
    st = F.ScalingType
    return {
        "per-tensor": lambda: torch._scaled_mm(a, wq.t(), scale_a=one, scale_b=one, out_dtype=bf),
        "per-tensor fast-accum": lambda: torch._scaled_mm(
            a, wq.t(), scale_a=one, scale_b=one, out_dtype=bf, use_fast_accum=True
        ),
        "row-wise": lambda: torch._scaled_mm(a, wq.t(), scale_a=ra, scale_b=rb, out_dtype=bf),
        "row-wise fast-accum": lambda: torch._scaled_mm(
            a, wq.t(), scale_a=ra, scale_b=rb, out_dtype=bf, use_fast_accum=True
        ),
        "block fast-accum": lambda: F.scaled_mm(
            a, wq.t(), sa, st.BlockWise1x128, sb, st.BlockWise128x128, output_dtype=bf, use_fast_accum=True
        ),
        "block fp32 out": lambda: F.scaled_mm(
            a, wq.t(), sa, st.BlockWise1x128, sb, st.BlockWise128x128, output_dtype=torch.float32
        ),
        "block torch._scaled_mm": lambda: torch._scaled_mm(
            a, wq.t(), scale_a=sa, scale_b=sb[: sa.shape[1]], out_dtype=bf
        ),
    }


def _cfgs(*specs):
    return [W4A16Config(*spec) for spec in specs]


# Candidate tiles per M range: (bm, bn, bk, split_k, num_warps, num_stages, unpack).
W4_SWEEP = {
    1: _cfgs(
        (1, 64, 128, 1, 4, 4, 2),
        (1, 128, 128, 4, 4, 4, 2),
        (16, 64, 128, 1, 4, 4, 0),
        (16, 64, 128, 1, 4, 4, 2),
        (16, 32, 128, 1, 4, 4, 2),
        (16, 64, 128, 2, 4, 4, 2),
        (16, 64, 128, 4, 4, 4, 2),
        (16, 128, 128, 1, 4, 4, 2),
        (16, 64, 128, 1, 8, 4, 2),
        (16, 64, 128, 1, 4, 6, 2),
    ),
    16: _cfgs(
        (16, 64, 128, 1, 4, 4, 0),
        (16, 64, 128, 1, 4, 4, 2),
        (16, 128, 128, 2, 4, 4, 2),
        (16, 32, 128, 1, 4, 4, 2),
        (16, 64, 128, 4, 4, 4, 2),
    ),
    64: _cfgs(
        (64, 64, 128, 1, 4, 4, 0),
        (64, 64, 128, 1, 4, 4, 2),
        (64, 128, 128, 1, 4, 3, 2),
        (32, 64, 128, 1, 4, 4, 2),
        (64, 64, 128, 2, 4, 4, 2),
    ),
    256: _cfgs(
        (64, 128, 128, 1, 4, 3, 0),
        (64, 128, 128, 1, 4, 3, 2),
        (128, 64, 128, 1, 4, 3, 2),
        (128, 128, 64, 1, 8, 3, 2),
    ),
}


def w4a16_dense(sweep: bool):
    for n, k in [(14336, 4096), (4096, 14336)]:
        w = torch.randn(n, k, device="cuda") * 0.02
        q, s = int4_group_quantize(w, 128)
        p = pack_int4(q)
        wb = w4a16_gemm.dequantize_packed(p, s, k, 128, torch.bfloat16)
        s = w4a16_gemm.group_major(s)  # the layout Int4Linear hands the kernel
        for m in (1, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wb.float().t()
            base = bench(lambda: x @ wb.t())
            y = w4a16_gemm.w4a16_linear(x, p, s, 128)
            t = bench(lambda: w4a16_gemm.w4a16_linear(x, p, s, 128))
            cfg = w4a16_gemm.default_config(m, n, k)
            row("w4a16 linear", f"M={m} {n}x{k}", base, t, rel(y, ref), f"default {cfg}")
            if sweep:
                best = None
                for c in W4_SWEEP[m if m in W4_SWEEP else 256]:
                    try:
                        e = rel(w4a16_gemm.w4a16_linear(x, p, s, 128, config=c), ref)
                        tc = bench(lambda c=c: w4a16_gemm.w4a16_linear(x, p, s, 128, config=c))
                    except Exception as ex:  # a config that does not compile is skipped, and said
                        print(f"    skip {c}: {type(ex).__name__}")
                        continue
                    print(f"    sweep M={m} {n}x{k} {c}: {tc:.1f} us ({base / tc:.2f}x) err {e:.1e}", flush=True)
                    if best is None or tc < best[0]:
                        best = (tc, c, e)
                row("w4a16 best of sweep", f"M={m} {n}x{k}", base, best[0], best[2], f"{best[1]}")


# Candidates timed in CUDA graphs (`--only graph --sweep`); `default_config` was chosen from these.
# (bm, bn, bk, split_k, num_warps, num_stages, unpack, swap, prefetch); unpack 4 with bm == 1 is the GEMV
# kernel (magic-number dequant, fp32 FMAs), unpack 2 the interleave of the first version.
GRAPH_SWEEP = {
    1: _cfgs(
        (1, 128, 128, 4, 4, 4, 2),
        (1, 64, 128, 8, 1, 1, 4),
        (1, 64, 128, 16, 1, 1, 4),
        (1, 64, 128, 8, 1, 1, 4, False, True),
        (1, 64, 128, 16, 1, 1, 4, False, True),
        (1, 32, 128, 8, 1, 1, 4, False, True),
        (1, 64, 256, 4, 1, 1, 4),
        (1, 64, 256, 8, 1, 1, 4),
        (1, 64, 256, 4, 1, 1, 4, False, True),
        (1, 64, 256, 8, 1, 1, 4, False, True),
        (1, 64, 256, 16, 1, 1, 4, False, True),
        (1, 32, 256, 8, 1, 1, 4, False, True),
        (1, 32, 256, 16, 1, 1, 4, False, True),
        (1, 64, 256, 8, 2, 1, 4, False, True),
        (1, 128, 256, 8, 4, 1, 4, False, True),
    ),
    16: _cfgs(
        (16, 64, 128, 4, 4, 4, 2),
        (16, 64, 128, 2, 4, 4, 2),
        (16, 64, 128, 8, 4, 4, 2),
        (16, 64, 128, 4, 4, 3, 2),
        (16, 64, 128, 4, 2, 4, 2),
        (16, 32, 128, 4, 4, 4, 2),
        (16, 64, 64, 4, 4, 4, 2),
        (16, 64, 128, 4, 4, 4, 2, True),
        (16, 64, 128, 2, 4, 4, 2, True),
        (16, 64, 128, 8, 4, 4, 2, True),
        (16, 128, 128, 4, 4, 4, 2, True),
        (16, 64, 128, 4, 4, 3, 2, True),
    ),
    64: _cfgs(
        (64, 64, 128, 1, 4, 4, 2),
        (64, 64, 128, 2, 4, 4, 2),
        (64, 64, 128, 1, 4, 4, 4),
        (64, 64, 128, 4, 4, 4, 4),
        (64, 64, 128, 2, 4, 4, 2, True),
    ),
}


def graph_decode(sweep: bool):
    """W4A16 at M = 1, 4, 16, 32, 64 and grouped decode, timed in CUDA graphs against bf16 in CUDA graphs."""
    for n, k in [(14336, 4096), (4096, 14336)]:
        copies = 4  # 4 x 29 MB of int4 weights, so that L2 never holds the next call's weights
        ws = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(copies)]
        qs = [int4_group_quantize(w, 128) for w in ws]
        packed = [(pack_int4(q), w4a16_gemm.group_major(sc)) for q, sc in qs]
        wbs = [w4a16_gemm.dequantize_packed(p, sc, k, 128, torch.bfloat16) for p, sc in packed]
        del ws, qs
        bt = w4a16_mma.repack_width(n)
        tiled = [(w4a16_mma.repack_tiles(p, bt), sc) for p, sc in packed]  # what Int4Linear stores
        for m in (1, 4, 16, 32, 64, 128, 256) if not sweep else (1, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = bench_graph([lambda wb=wb: x @ wb.t() for wb in wbs[:2]])
            ref = x.float() @ wbs[0].float().t()
            for c in GRAPH_SWEEP[m] if sweep else [None]:  # None: what w4a16_linear picks (mma at 2-32 rows)
                err = rel(w4a16_gemm.w4a16_linear(x, *packed[0], 128, config=c), ref)
                t = bench_graph(
                    [lambda p=p, sc=sc, c=c: w4a16_gemm.w4a16_linear(x, p, sc, 128, config=c) for p, sc in packed]
                )
                mma = c is None and 2 <= m <= w4a16_gemm.MMA_MAX_ROWS and kernels.W4A16_MMA
                note = f"mma {w4a16_mma.mma_config(n, k, m)}" if mma else c
                if c is None and m > w4a16_gemm.MAX_M:
                    note = "dequantize (Triton) + cuBLAS"
                row(
                    "w4a16 (CUDA graph)",
                    f"M={m} {n}x{k}",
                    base,
                    t,
                    err,
                    str(note or w4a16_gemm.default_config(m, n, k)),
                )
            if not sweep:  # the same call on Int4Linear's repacked column tiles
                err = rel(w4a16_gemm.w4a16_linear(x, *tiled[0], 128), ref)
                t = bench_graph([lambda p=p, sc=sc: w4a16_gemm.w4a16_linear(x, p, sc, 128) for p, sc in tiled])
                row("w4a16 tiles (CUDA graph)", f"M={m} {n}x{k}", base, t, err, f"tiles of {bt}")
    g = torch.Generator().manual_seed(0)
    for name, e, n, k, rows in [
        ("Qwen3-30B gate_up, 512 rows", 128, 1536, 2048, 512),
        ("Qwen3-30B down, 512 rows", 128, 2048, 768, 512),
        ("Qwen3-30B gate_up, 64 rows", 128, 1536, 2048, 64),
    ]:
        counts = torch.bincount(torch.randint(0, e, (rows,), generator=g), minlength=e).cuda()
        xs = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(e, n, k, device="cuda") * 0.02
        wb = w.bfloat16()
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        base = bench_graph([lambda: torch._grouped_mm(xs, wb.transpose(-2, -1), offs=offs)])
        wq, wsc = fp8_block_quantize(w)
        ref = fp8_gemm.grouped_fp8_linear_reference(xs.float(), wq, wsc, counts)
        err = rel(fp8_gemm.grouped_fp8_linear(xs, wq, wsc, counts), ref)
        t = bench_graph([lambda: fp8_gemm.grouped_fp8_linear(xs, wq, wsc, counts)])
        row("grouped fp8 (CUDA graph)", name, base, t, err)
        q, sc = int4_group_quantize(w, 128)
        p = pack_int4(q)
        ref = w4a16_gemm.grouped_w4a16_linear_reference(xs.float(), p, sc, counts, 128)
        sc = w4a16_gemm.group_major(sc)
        for c in GROUPED_W4_GRAPH if sweep else [None]:
            err = rel(w4a16_gemm.grouped_w4a16_linear(xs, p, sc, counts, 128, config=c), ref)
            t = bench_graph([lambda c=c: w4a16_gemm.grouped_w4a16_linear(xs, p, sc, counts, 128, config=c)])
            row("grouped w4a16 (CUDA graph)", name, base, t, err, str(c or "default"))


GROUPED_W4_GRAPH = _cfgs((16, 64, 128, 1, 4, 4, 2), (16, 128, 128, 1, 4, 4, 2))
NO_FUSE = dict(fuse=False, swap=False)
GROUPED_FP8_SWEEP = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4), (128, 64, 4, 3)]
GROUPED_W4_SWEEP = _cfgs(
    (16, 64, 128, 1, 4, 4, 0),
    (16, 64, 128, 1, 4, 4, 2),
    (16, 128, 128, 1, 4, 4, 2),
    (64, 64, 128, 1, 4, 4, 2),
    (64, 128, 64, 1, 4, 3, 2),
    (128, 128, 64, 1, 8, 3, 2),
)


def grouped(sweep: bool):
    cases = [
        ("8 experts, 2048 rows each", 8, 4096, 4096, 16384),
        ("Qwen3-30B gate_up, 4096 rows", 128, 1536, 2048, 4096),
        ("Qwen3-30B down, 4096 rows", 128, 2048, 768, 4096),
        ("Qwen3-30B gate_up, 512 rows", 128, 1536, 2048, 512),
        ("Qwen3-30B down, 512 rows", 128, 2048, 768, 512),
    ]
    g = torch.Generator().manual_seed(0)
    for name, e, n, k, rows in cases:
        if e == 8:
            counts = torch.full((e,), rows // e)
        else:
            counts = torch.bincount(torch.randint(0, e, (rows,), generator=g), minlength=e)
        counts = counts.cuda()
        m = int(counts.sum())
        xs = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(e, n, k, device="cuda") * 0.02
        wb = w.bfloat16()
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        base = bench(lambda: torch._grouped_mm(xs, wb.transpose(-2, -1), offs=offs))
        wq, ws = fp8_block_quantize(w)
        ref = fp8_gemm.grouped_fp8_linear_reference(xs.float(), wq, ws, counts)
        variants = [None] + (GROUPED_FP8_SWEEP if sweep else [])  # None: the default (grouped_fp8_config)
        best = None
        for v in variants:  # the sweep: act-quant first, unswapped tiles (bm, bn, num_warps, num_stages)
            kw = {**dict(zip(("bm", "bn", "num_warps", "num_stages"), v, strict=True)), **NO_FUSE} if v else {}
            fn = lambda kw=kw: fp8_gemm.grouped_fp8_linear(xs, wq, ws, counts, **kw)
            t, err = bench(fn), rel(fn(), ref)
            if sweep:
                print(f"    sweep grouped fp8 {name} {v or 'default'}: {t:.1f} us", flush=True)
            best = min(best, (t, err, str(v or "default"))) if best else (t, err, str(v or "default"))
        t, err, cfg = best
        row("grouped fp8", name, base, t, err, f"{2 * m * n * k / t / 1e6:.0f} TFLOP/s {cfg}")
        q, s = int4_group_quantize(w, 128)
        p = pack_int4(q)
        ref = w4a16_gemm.grouped_w4a16_linear_reference(xs.float(), p, s, counts, 128)
        s = w4a16_gemm.group_major(s)
        best = None
        for c in GROUPED_W4_SWEEP if sweep else [None]:
            fn = lambda c=c: w4a16_gemm.grouped_w4a16_linear(xs, p, s, counts, 128, config=c)
            t, err = bench(fn), rel(fn(), ref)
            if sweep:
                print(f"    sweep grouped w4a16 {name} {c}: {t:.1f} us", flush=True)
            best = min(best, (t, err, str(c))) if best else (t, err, str(c))
        t, err, cfg = best
        row("grouped w4a16", name, base, t, err, f"{2 * m * n * k / t / 1e6:.0f} TFLOP/s {cfg}")


PREFILL_GROUPED = [  # (name, experts, N, K, tokens): one rollout prefill chunk of Qwen3-30B-A3B (top-8)
    ("gate_up, prefill 16k tokens", 128, 1536, 2048, 16384),
    ("down, prefill 16k tokens", 128, 2048, 768, 16384),
    ("gate_up, prefill 32k tokens", 128, 1536, 2048, 32768),
]
# (bm, bn, num_warps, num_stages, nfast, ku): act-quant first; nfast = the N tiles of one row tile run
# side by side (grid axis 0), so its activations are read from L2 instead of once per N tile from HBM
PREFILL_FP8_SWEEP = [  # (bm, bn, num_warps, num_stages, nfast, K blocks per loop iteration)
    (64, 128, 4, 3, False, 1),
    (64, 128, 4, 3, True, 1),
    (64, 128, 4, 4, True, 1),
    (128, 128, 8, 3, True, 1),
    (64, 128, 4, 2, True, 2),
    (64, 128, 4, 3, True, 2),
    (128, 128, 8, 2, True, 2),
    (128, 64, 4, 3, True, 2),
]


def prefill_grouped(sweep: bool):
    """The experts of a rollout prefill chunk (tokens x top-8 rows, routed at random): grouped FP8
    (act-quant + the Triton kernel; the default, and with --sweep the candidates) vs bf16 `_grouped_mm`."""
    g = torch.Generator().manual_seed(0)
    for case in PREFILL_GROUPED:
        _prefill_case(*case, g, sweep)
        torch.cuda.empty_cache()


def _prefill_case(name: str, e: int, n: int, k: int, tokens: int, g: torch.Generator, sweep: bool) -> None:
    rows = tokens * 8
    counts = torch.bincount(torch.randint(0, e, (rows,), generator=g), minlength=e).cuda()
    xs = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(e, n, k, device="cuda") * 0.02
    wb = w.bfloat16()
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    base_fn = lambda: torch._grouped_mm(xs, wb.transpose(-2, -1), offs=offs)
    base = bench(base_fn)
    ref = base_fn().float()
    wq, ws = fp8_block_quantize(w)
    del w
    keys = ("bm", "bn", "num_warps", "num_stages", "nfast", "ku")
    for v in [None] + (PREFILL_FP8_SWEEP if sweep else []):
        kw = {**dict(zip(keys, v, strict=True)), **NO_FUSE} if v else {}
        fn = lambda kw=kw: fp8_gemm.grouped_fp8_linear(xs, wq, ws, counts, **kw)
        t, err = bench(fn), rel(fn(), ref)
        tf = 2 * rows * n * k / t / 1e6
        row("prefill grouped fp8", name, base, t, err, f"{tf:.0f} TFLOP/s {v or 'default'} (err vs bf16 output)")


DECODE_M = 64  # rows of one decode step at batch 64
DECODE_DENSE = [("q_proj", 4096, 2048), ("o_proj", 2048, 4096), ("k/v_proj", 512, 2048)]  # (name, N, K)
DECODE_GROUPED = [  # (name, experts, N, K, rows): Qwen3-30B-A3B experts, 64 tokens x top-8 = 512 rows
    ("gate_up, 512 rows", 128, 1536, 2048, 512),
    ("down, 512 rows", 128, 2048, 768, 512),
    ("gate_up, 64 rows", 128, 1536, 2048, 64),
]
ROTATE_BYTES = 256 << 20  # FP8 weight copies per dense shape, together ~5x the L2
PREVIOUS_GROUPED_FP8 = (64, 128, 4, 3)  # bm, bn, num_warps, num_stages of the previous default


def _dense_candidates(base: Fp8Config, k: int) -> list[Fp8Config]:
    """Around dense_fp8_config's choice: other split-K, tile width, warps, stages, the swapped MMA."""
    kb = -(-k // 128)
    out = [replace(base, split_k=s) for s in (1, 2, 4, 8, 16) if s != base.split_k and 2 * s <= kb]
    out += [replace(base, bn=192 - base.bn), replace(base, num_stages=3), replace(base, num_warps=12 - base.num_warps)]
    return out + [replace(base, swap=not base.swap, bm=16 if base.swap else base.bm, num_warps=4)]


GROUPED_FP8_DECODE_SWEEP = [  # fused; (bm, bn, num_warps, num_stages, swap)
    (16, 128, 4, 3, True),
    (16, 128, 4, 4, True),
    (16, 64, 4, 4, True),
    (32, 128, 4, 4, True),
    (16, 128, 8, 4, True),
    (64, 128, 4, 3, False),
    (64, 128, 8, 3, False),
]


def _dense_copies(n: int, k: int):
    """Weight copies of one shape (FP8 + cuBLAS scales, and bf16), together beyond the L2."""
    quant, bf16 = [], []
    for _ in range(max(2, ROTATE_BYTES // (n * k))):
        w = torch.randn(n, k, device="cuda") * 0.02
        wq, ws = fp8_block_quantize(w)
        quant.append((wq, ws, fp8_gemm.prepare_weight_scale(ws)))
        bf16.append(w.bfloat16())
    return quant, bf16


def decode_dense(sweep: bool):
    """FP8 dense projections at M = 64 in CUDA graphs: the fused Triton kernel vs act-quant + cuBLAS vs bf16."""
    m = DECODE_M
    for name, n, k in DECODE_DENSE:
        quant, wbs = _dense_copies(n, k)
        reps = max(1, 400 // len(quant))  # ~400 calls per graph
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        base = bench_graph([lambda wb=wb: x @ wb.t() for wb in wbs], reps)
        ref = fp8_gemm.fp8_linear_reference(x.float(), *quant[0][:2])
        cfg = fp8_gemm.dense_fp8_config(m, n, k)
        unfused = replace(cfg, fuse=False)
        two = fp8_gemm.fp8_dense_triton(x, *quant[0][:2], unfused)
        variants = [
            ("act-quant + cuBLAS (before)", None, lambda wq, ws, sb: fp8_gemm._fp8_linear_cublas(x, wq, ws, sb)),
            ("act-quant + triton dense", cfg, lambda wq, ws, sb: fp8_gemm.fp8_dense_triton(x, wq, ws, unfused)),
            ("fused triton dense (now)", cfg, lambda wq, ws, sb: fp8_gemm.fp8_linear(x, wq, ws, scale_b=sb)),
        ]
        if sweep:
            variants += [("fused, sweep", c, lambda wq, ws, sb, c=c: fp8_gemm.fp8_dense_triton(x, wq, ws, c))
                         for c in _dense_candidates(cfg, k)]  # fmt: skip
        for label, c, fn in variants:
            y = fn(*quant[0])
            t = bench_graph([lambda q=q: fn(*q) for q in quant], reps)
            now = label.endswith("(now)")
            note = _cfg_note(c) + (f", bitwise == act-quant + triton: {torch.equal(y, two)}" if now else "")
            row(f"dense fp8 M={m}: {label}", f"{name} {n}x{k}", base, t, rel(y, ref), note)


def _cfg_note(c) -> str:
    if c is None:
        return ""
    return f"bm={c.bm} bn={c.bn} split={c.split_k} warps={c.num_warps} stages={c.num_stages} swap={c.swap}"


def decode_grouped(sweep: bool):
    """Grouped FP8 / W4A16 at decode sizes in CUDA graphs: the previous path (act-quant + expert_tiles
    prep + kernel) against the in-kernel tile map and the fused quantization, and bf16 _grouped_mm."""
    g = torch.Generator().manual_seed(0)
    for name, e, n, k, rows in DECODE_GROUPED:
        counts = torch.bincount(torch.randint(0, e, (rows,), generator=g), minlength=e).cuda()  # int64, as the MoE
        xs = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(e, n, k, device="cuda") * 0.02
        wb = w.bfloat16()
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        base = bench_graph([lambda: torch._grouped_mm(xs, wb.transpose(-2, -1), offs=offs)])
        wq, ws = fp8_block_quantize(w)
        ref = fp8_gemm.grouped_fp8_linear_reference(xs.float(), wq, ws, counts)
        cfg = fp8_gemm.grouped_fp8_config(rows, e)
        now = (cfg.bm, cfg.bn, cfg.num_warps, cfg.num_stages)
        two = fp8_gemm.grouped_fp8_linear_triton(xs, wq, ws, counts, *now, swap=cfg.swap)
        old = PREVIOUS_GROUPED_FP8
        variants = [
            ("act-quant + prep + kernel (before)", dict(prep=True), old),
            ("act-quant + kernel, tile map in-kernel", {}, old),
            ("fused, 64-row tiles", dict(fuse=True), old),
            ("fused, default tiles (now)", dict(fuse=True, swap=cfg.swap), now),
        ]
        if sweep:
            variants += [("fused, sweep", dict(fuse=True, swap=v[4]), v[:4]) for v in GROUPED_FP8_DECODE_SWEEP]
        for label, kw, tiles in variants:
            fn = lambda kw=kw, tiles=tiles: fp8_gemm.grouped_fp8_linear_triton(xs, wq, ws, counts, *tiles, **kw)
            y, t = fn(), bench_graph([fn])
            same = label.endswith("(now)")
            note = f"tiles {tiles} {kw}" + (f", bitwise == two-kernel: {torch.equal(y, two)}" if same else "")
            row(f"grouped fp8: {label}", name, base, t, rel(y, ref), note)
        q, sc = int4_group_quantize(w, 128)
        p = pack_int4(q)
        ref = w4a16_gemm.grouped_w4a16_linear_reference(xs.float(), p, sc, counts, 128)
        sc = w4a16_gemm.group_major(sc)
        wcfg = W4A16Config(bm=16, bn=64, bk=128)  # grouped_w4a16_linear's decode tiles
        for label, prep in (("prep + kernel (before)", True), ("tile map in-kernel (now)", False)):
            fn = lambda prep=prep: w4a16_gemm.grouped_w4a16_linear_triton(xs, p, sc, counts, 128, wcfg, prep=prep)
            y, t = fn(), bench_graph([fn])
            row(f"grouped w4a16: {label}", name, base, t, rel(y, ref), str(wcfg))


def decode(sweep: bool):
    decode_dense(sweep)
    decode_grouped(sweep)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--only", default="fp8,w4a16,grouped")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    only = args.only.split(",")
    for name, fn in [
        ("fp8", lambda: fp8_dense(args.sweep)),
        ("w4a16", lambda: w4a16_dense(args.sweep)),
        ("grouped", lambda: grouped(args.sweep)),
        ("graph", lambda: graph_decode(args.sweep)),
        ("decode", lambda: decode(args.sweep)),
        ("prefill", lambda: prefill_grouped(args.sweep)),
    ]:
        if name in only:
            try:
                fn()
            except Exception as ex:  # keep the rest of the table; the failure is printed
                print(f"!! {name} failed: {type(ex).__name__}: {str(ex)[:500]}", flush=True)
    print("\n| what | shape | bf16 us | quant us | speed-up | rel err | note |")
    print("|---|---|---|---|---|---|---|")
    for grp, shape, b, t, sp, err, note in ROWS:
        print(f"| {grp} | {shape} | {b:.1f} | {t:.1f} | {sp:.2f}x | {err:.1e} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
