# ruff: noqa: B023 (each lambda is timed at once, inside its loop iteration)
"""Quantized GEMMs against bf16, on the GPU, with the baselines measured in the same run.

    PYTHONPATH=. python bench/quant.py                        # eager tables (about 2 minutes on an H100)
    PYTHONPATH=. python bench/quant.py --only graph           # decode sizes in CUDA graphs, default tiles
    PYTHONPATH=. python bench/quant.py --only graph --sweep   # the tile sweeps behind default_config

Rows (median of triton.testing.do_bench, which flushes L2 before each repetition):
- FP8 block-scaled linear (Triton 1x128 act-quant + cuBLAS 1x128 x 128x128 `scaled_mm`) vs bf16
  `x @ w.t()`, on large GEMMs; also the cuBLAS call alone (activations pre-quantized) and cuBLAS's
  per-tensor / row-wise recipes and options on the same operands (its ceilings on this device).
- W4A16 (Triton, in-kernel dequant) vs bf16 on 14336x4096 and 4096x14336 weights at M=1..256.
- Grouped experts: Triton grouped FP8 and grouped W4A16 vs bf16 `torch._grouped_mm`.
- `--only graph`: the decode sizes again, each timed inside a CUDA graph (as a decode engine runs
  them), which takes the Python launch overhead (wrapper + Triton launcher, tens of us) out of the
  numbers; weights rotate over copies that together exceed the 50 MB L2.
Every timed kernel is first checked against the reference (relative error printed).
"""

from __future__ import annotations

import argparse
import sys

import torch
from triton.testing import do_bench

from miles_core.kernels import fp8_gemm, w4a16_gemm
from miles_core.kernels.w4a16_gemm import W4A16Config
from miles_core.quant import fp8_block_quantize, int4_group_quantize, pack_int4

ROWS: list[tuple] = []


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


GRAPH_REPS = 20


def bench_graph(calls) -> float:
    """us per call: `calls` (closures over different weight copies) replayed GRAPH_REPS times in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, cuBLAS workspaces) off the capture
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_REPS):
            for c in calls:
                c()
    torch.cuda.synchronize()
    return do_bench(graph.replay, warmup=5, rep=50, return_mode="median") * 1e3 / (GRAPH_REPS * len(calls))


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def row(group, shape, base_us, us, err, note=""):
    ROWS.append((group, shape, base_us, us, base_us / us, err, note))
    speed = f"bf16 {base_us:9.1f} us  quant {us:9.1f} us  {base_us / us:5.2f}x"
    print(f"  {group:<22} {shape:<28} {speed}  err {err:.1e} {note}", flush=True)


def fp8_dense():
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
    """W4A16 at M = 1, 16, 64 and grouped decode, timed in CUDA graphs against bf16 in CUDA graphs."""
    for n, k in [(14336, 4096), (4096, 14336)]:
        copies = 4  # 4 x 29 MB of int4 weights, so that L2 never holds the next call's weights
        ws = [torch.randn(n, k, device="cuda") * 0.02 for _ in range(copies)]
        qs = [int4_group_quantize(w, 128) for w in ws]
        packed = [(pack_int4(q), w4a16_gemm.group_major(sc)) for q, sc in qs]
        wbs = [w4a16_gemm.dequantize_packed(p, sc, k, 128, torch.bfloat16) for p, sc in packed]
        del ws, qs
        for m in (1, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = bench_graph([lambda wb=wb: x @ wb.t() for wb in wbs[:2]])
            ref = x.float() @ wbs[0].float().t()
            for c in GRAPH_SWEEP[m] if sweep else [w4a16_gemm.default_config(m, n, k)]:
                err = rel(w4a16_gemm.w4a16_linear(x, *packed[0], 128, config=c), ref)
                t = bench_graph(
                    [lambda p=p, sc=sc, c=c: w4a16_gemm.w4a16_linear(x, p, sc, 128, config=c) for p, sc in packed]
                )
                row("w4a16 (CUDA graph)", f"M={m} {n}x{k}", base, t, err, str(c))
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
        variants = GROUPED_FP8_SWEEP if sweep else GROUPED_FP8_SWEEP[:1]
        best = None
        for bm, bn, nw, ns in variants:
            fn = lambda bm=bm, bn=bn, nw=nw, ns=ns: fp8_gemm.grouped_fp8_linear(xs, wq, ws, counts, bm, bn, nw, ns)
            t, err = bench(fn), rel(fn(), ref)
            if sweep:
                print(f"    sweep grouped fp8 {name} bm={bm} bn={bn} nw={nw} ns={ns}: {t:.1f} us", flush=True)
            best = min(best, (t, err, (bm, bn, nw, ns))) if best else (t, err, (bm, bn, nw, ns))
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--only", default="fp8,w4a16,grouped")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    only = args.only.split(",")
    for name, fn in [
        ("fp8", fp8_dense),
        ("w4a16", lambda: w4a16_dense(args.sweep)),
        ("grouped", lambda: grouped(args.sweep)),
        ("graph", lambda: graph_decode(args.sweep)),
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
