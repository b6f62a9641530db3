# ruff: noqa: B023 (each lambda is timed at once, inside its loop iteration)
"""Experiment: the Gluon FP8 block-scaled GEMM (miles_core/kernels/fp8_wgmma.py) against cuBLAS, per config.

    PYTHONPATH=. python bench/exp_fp8_wgmma.py            # the four large shapes, every config (~1-2 minutes)
    PYTHONPATH=. python bench/exp_fp8_wgmma.py --quick    # 8192 x 8192 x 8192 only
    PYTHONPATH=. python bench/exp_fp8_wgmma.py --configs 128x128s5g8,128x256s3g8
    PYTHONPATH=. python bench/exp_fp8_wgmma.py --grouped  # MoE experts: the grouped kernel (~1-2 minutes)

For each shape (M x N x K) the operands come from the real quantizers (the Triton act-quant kernel with
cuBLAS's scale layout, `fp8_block_quantize` for the weight), and in the same run: bf16 `x @ w.t()`, cuBLAS's
block-scaled `scaled_mm` on the same FP8 operands (what `fp8_linear` runs today), each config of
`fp8_wgmma.configs()` (checked first against the cuBLAS output: rel err printed, a wrong or failing config is
a row, not the end of the sweep), and the whole linear (act-quant + the fastest config) against bf16, the
number the goal is stated in (>= 1.6x bf16). Times: median of `triton.testing.do_bench` (L2 flushed before
each repetition), via bench/quant.py's helpers.

`--grouped`: Qwen3-30B-A3B's experts (E = 128; gate_up 1536 x 2048, down 2048 x 768) at 4,096 / 32,768 /
262,144 rows (or `--rows`; 262,144 is bench/rollout.py's prefill chunk) routed uniformly at random (counts on
the GPU), bf16 `torch._grouped_mm` against the Triton grouped FP8 GEMM (`grouped_fp8_linear_triton` with its
prefill tiles, `grouped_fp8_config`) and each config of `fp8_wgmma_grouped.grouped_configs()` on the same
quantized operands (the act-quant's output; the GEMM alone); rel err against the fp32 reference on those
operands (`grouped_fp8_block_gemm_reference`). `--repeat N` times each config N times (their spread).
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.quant import bench, rel
from miles_core.kernels import fp8_gemm, fp8_wgmma, fp8_wgmma_grouped
from miles_core.kernels.fp8_wgmma import GemmConfig
from miles_core.kernels.fp8_wgmma_grouped import GroupedConfig
from miles_core.quant import fp8_block_quantize

SHAPES = [(8192, 8192, 8192), (4096, 14336, 4096), (4096, 4096, 14336), (16384, 7168, 2048)]
MAX_ERR = 1e-2  # against cuBLAS: both ~3e-3 from the fp32 reference (bf16 output); a wrong tile is O(1)
ROWS: list[str] = []


def label(c: GemmConfig) -> str:
    return f"{c.block_m}x{c.block_n}s{c.stages}g{c.group_m}{'' if c.fence else 'nf'}{'h' if c.epi_half else ''}"


def row(shape: str, what: str, us: float, flop: float, base: float, cublas: float, err: float | str) -> None:
    err_s = err if isinstance(err, str) else f"{err:.1e}"
    line = f"| {shape} | {what} | {us:.1f} | {flop / us / 1e6:.0f} | {base / us:.2f}x | {cublas / us:.2f}x | {err_s} |"
    ROWS.append(line)
    print(line, flush=True)


def failed(shape: str, what: str, why: str) -> None:
    line = f"| {shape} | {what} | - | - | - | - | FAILED: {why[:160]} |"
    ROWS.append(line)
    print(line, flush=True)


def operands(m: int, n: int, k: int):
    """x [M, K] bf16 and its act-quant (a [M, K] e4m3, sa [M, K/128] column-major), the weight in bf16 and e4m3
    with its 128x128 scales, and those scales in cuBLAS's layout."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda") * 0.02
    wq, ws = fp8_block_quantize(w)
    a, sa = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)
    return x, w.bfloat16(), a, sa, wq, ws, fp8_gemm.prepare_weight_scale(ws)


def sweep(m: int, n: int, k: int, cfgs: list[GemmConfig]) -> None:
    shape, flop = f"{m}x{n}x{k}", 2.0 * m * n * k
    print(f"# {shape}", flush=True)
    x, wb, a, sa, wq, ws, sb = operands(m, n, k)
    base = bench(lambda: x @ wb.t())
    y_cublas = fp8_gemm._scaled_mm(a, wq.t(), sa, sb, torch.bfloat16)[:m]
    cublas = bench(lambda: fp8_gemm._scaled_mm(a, wq.t(), sa, sb, torch.bfloat16))
    row(shape, "bf16 x @ w.t()", base, flop, base, cublas, "-")
    row(shape, "cuBLAS block-scaled", cublas, flop, base, cublas, 0.0)
    best = None
    for cfg in cfgs:
        try:
            y = fp8_wgmma.fp8_block_gemm(a, sa, wq, ws, config=cfg)[:m]
            err = rel(y, y_cublas)
            if not err < MAX_ERR:  # NaN included
                failed(shape, label(cfg), f"wrong result, rel err {err:.2e} against cuBLAS")
                continue
            us = bench(lambda: fp8_wgmma.fp8_block_gemm(a, sa, wq, ws, config=cfg))
        except Exception as ex:  # a config that does not compile or launch is a row of the table
            failed(shape, label(cfg), f"{type(ex).__name__}: {ex}".replace("\n", " "))
            continue
        row(shape, label(cfg), us, flop, base, cublas, err)
        best = (us, cfg) if best is None or us < best[0] else best
    linear_cublas = bench(lambda: fp8_gemm.fp8_linear(x, wq, ws, scale_b=sb, backend="cublas"))
    row(shape, "linear: act-quant + cuBLAS", linear_cublas, flop, base, cublas, "-")
    if best is not None:
        cfg = best[1]
        y = fp8_wgmma.fp8_block_gemm(*fp8_gemm.fp8_act_quant(x, 4, True), wq, ws, config=cfg)[:m]
        us = bench(lambda: fp8_wgmma.fp8_block_gemm(*fp8_gemm.fp8_act_quant(x, 4, True), wq, ws, config=cfg))
        row(shape, f"linear: act-quant + {label(cfg)}", us, flop, base, cublas, rel(y, y_cublas))


GROUPED_SHAPES = [("gate_up", 1536, 2048), ("down", 2048, 768)]  # Qwen3-30B-A3B experts: (case, N, K)
GROUPED_ROWS = [4096, 32768, 262144]  # 262,144: the rollout's prefill chunk (32,768 tokens x top-8)
GROUPED_EXPERTS = 128


def glabel(c: GroupedConfig) -> str:
    return f"{c.block_m}x{c.block_n}s{c.stages}g{c.group_m}{'' if c.fence else 'nf'}{'c' if c.coalesce else ''}"


def grouped_row(case: str, rows: int, what: str, us: float | None, base: float, triton: float, err) -> None:
    if us is None:
        line = f"| {case} | {rows} | {what} | - | - | - | FAILED: {str(err)[:160]} |"
    else:
        err_s = err if isinstance(err, str) else f"{err:.1e}"
        line = f"| {case} | {rows} | {what} | {us:.1f} | {base / us:.2f}x | {triton / us:.2f}x | {err_s} |"
    ROWS.append(line)
    print(line, flush=True)


def grouped_case(case: str, wb: torch.Tensor, wq, ws, rows: int, cfgs: list[GroupedConfig]) -> None:
    """One expert GEMM at `rows` rows: bf16 `_grouped_mm`, the Triton grouped FP8 kernel and each Gluon config."""
    e, n, k = wq.shape
    counts = torch.bincount(torch.randint(0, e, (rows,), device="cuda"), minlength=e)  # [E] int64, on the GPU
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)  # [M, K], rows sorted by expert
    a, sa = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)  # [M, K] e4m3, [M, K/128] column-major
    sa_rows = sa.contiguous()  # [M, K/128] row-major: the layout the Triton kernel indexes
    ref = fp8_wgmma_grouped.grouped_fp8_block_gemm_reference(a, sa, wq, ws, counts, torch.float32)  # [M, N] fp32
    base = bench(lambda: torch._grouped_mm(x, wb.transpose(-2, -1), offs=offs))
    t = fp8_gemm.grouped_fp8_config(rows, e)
    tiles = dict(bm=t.bm, bn=t.bn, num_warps=t.num_warps, num_stages=t.num_stages, swap=t.swap, nfast=t.nfast)
    triton_fn = lambda: fp8_gemm.grouped_fp8_linear_triton(
        a, wq, ws, counts, x_scale=sa_rows, out_dtype=torch.bfloat16, **tiles
    )
    try:
        triton_err, triton_us = rel(triton_fn(), ref), bench(triton_fn)
    except Exception as ex:  # its row says why; the Gluon rows still run
        triton_err, triton_us = f"{type(ex).__name__}: {ex}".replace("\n", " "), None
    grouped_row(case, rows, "bf16 torch._grouped_mm", base, base, triton_us or float("nan"), "-")
    grouped_row(case, rows, f"Triton FP8 {t.bm}x{t.bn}", triton_us, base, triton_us or float("nan"), triton_err)
    triton_us = triton_us or float("nan")
    for cfg in cfgs:
        fn = lambda: fp8_wgmma_grouped.grouped_fp8_block_gemm(a, sa, wq, ws, counts, config=cfg)
        try:
            err = rel(fn(), ref)
            if not err < MAX_ERR:  # NaN included
                grouped_row(case, rows, glabel(cfg), None, base, triton_us, f"wrong result, rel err {err:.2e}")
                continue
            grouped_row(case, rows, glabel(cfg), bench(fn), base, triton_us, err)
        except Exception as ex:  # a config that does not compile or launch is a row of the table
            grouped_row(case, rows, glabel(cfg), None, base, triton_us, f"{type(ex).__name__}: {ex}".replace("\n", " "))


def grouped_main(cfgs: list[GroupedConfig], rows_list: list[int], repeat: int = 1) -> None:
    head = "| case | rows | kernel | us | vs bf16 | vs Triton FP8 | rel err |\n|---|---|---|---|---|---|---|"
    print(head)
    for case, n, k in GROUPED_SHAPES:
        w = torch.randn(GROUPED_EXPERTS, n, k, device="cuda") * 0.02  # [E, N, K]
        wq, ws = fp8_block_quantize(w)  # [E, N, K] e4m3, [E, N/128, K/128]
        wb = w.bfloat16()
        del w
        for rows in rows_list:
            try:
                grouped_case(case, wb, wq, ws, rows, cfgs * repeat)
            except Exception as ex:  # keep the other cases; the failure is printed
                grouped_row(case, rows, "setup", None, 0.0, 0.0, f"{type(ex).__name__}: {ex}")
            torch.cuda.empty_cache()
        del wb, wq, ws
    print("\n" + head)
    print("\n".join(ROWS), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8192 x 8192 x 8192 only")
    ap.add_argument("--configs", default="", help="comma-separated labels (e.g. 128x128s5g8); default: all")
    ap.add_argument("--grouped", action="store_true", help="the grouped (MoE experts) kernel instead")
    ap.add_argument("--rows", default=",".join(map(str, GROUPED_ROWS)), help="--grouped: comma-separated row counts")
    ap.add_argument("--repeat", type=int, default=1, help="--grouped: time each config this many times (spread)")
    args = ap.parse_args()
    if args.grouped:
        gcfgs = fp8_wgmma_grouped.grouped_configs()
        gcfgs = [c for c in gcfgs if not args.configs or glabel(c) in args.configs.split(",")]
        torch.manual_seed(0)
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {[glabel(c) for c in gcfgs]}", flush=True)
        grouped_main(gcfgs, [int(r) for r in args.rows.split(",")], args.repeat)
        return 0
    cfgs = fp8_wgmma.configs()
    if args.configs:
        cfgs = [c for c in cfgs if label(c) in args.configs.split(",")]
    torch.manual_seed(0)
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, configs {[label(c) for c in cfgs]}", flush=True
    )
    print("| shape | config | us | TFLOP/s | vs bf16 | vs cuBLAS block | rel err |\n|---|---|---|---|---|---|---|")
    for m, n, k in SHAPES[:1] if args.quick else SHAPES:
        try:
            sweep(m, n, k, cfgs)
        except Exception as ex:  # keep the other shapes; the failure is printed
            failed(f"{m}x{n}x{k}", "setup", f"{type(ex).__name__}: {ex}")
        torch.cuda.empty_cache()
    print("\n| shape | config | us | TFLOP/s | vs bf16 | vs cuBLAS block | rel err |\n|---|---|---|---|---|---|---|")
    print("\n".join(ROWS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
