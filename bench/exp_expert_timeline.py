"""Experiment: where the FP8 decode expert GEMM's ~4 us fixed cost per launch goes (results: bench/RESULTS.md,
"Rollout decode", fifteenth session: no ramp, a ~0.9 us tile map hidden by the other programs, and a tail of
~10 us at batch 64 while SMs drain ~27 us programs; splitting the work to shorten it was slower).

    PYTHONPATH=. python bench/exp_expert_timeline.py [--batch 64 256] [--split 1 2 4]

The grouped FP8 GEMM at decode (`grouped_fp8_kernel`, 16-row tiles, weights on wgmma's M side) streams its
weights at 0.98x the copy rate in the steady state and pays ~4.2 us per launch beyond that (bench/RESULTS.md,
sixth session), 16 launches a step: the one pool of FP8-only time the size of issue 6's missing 45 us per
step. Launch gaps inside a CUDA graph are ~0.6 us (fourteenth session), so the rest is inside the kernel:
programs starting late (ramp), their tile map's latency, or SMs idle while the last programs finish (tail).

Here a copy of the kernel's decode path stamps each program with `%globaltimer` at entry, after its tile map,
after its K loop and after its store, and `%smid`, on the rollout bench's shapes (Qwen3-30B-A3B gate_up and
down, 128 experts, rows routed at random, each launch on a weight copy not read for 7 launches, so beyond the
L2). It prints, per launch: the span, the programs' start spread (ramp: until 90% of the SMs run one), the
tail (from the first SM to go idle for good to the end), the median / p90 program time, the tile map's
latency, the rate over the span and over the middle 80% of it, against the copy rate, and how many programs
run at each tenth of the span. The stamped kernel is timed against the real one in the same graph setup, so
the stamps' own cost shows. `--split S`: also the same bytes as S x N by K / S, the programs split-K S would
give (without its reduction).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from bench.decode_kernels import _cycle, graph_us
from miles_core.kernels import fp8_gemm
from miles_core.kernels.quant_triton import _expert_tile, _fp8_block_dot


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def timed_kernel(
    A, SA, B, SB, Y, COUNTS, TL, E, N, K,
    stride_am, stride_sam, stride_be, stride_bn, stride_sbe, stride_sbn, stride_ym, EPS,
    E_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    # grouped_fp8_kernel's decode path (SWAP, rows already in FP8, no gather), and TL [programs, 6] int64:
    # entry, tile map known, K loop done, stored (ns), SM, expert (E: no tile)
    t0 = _now()
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    e, e_safe, r0, r1 = _expert_tile(COUNTS, COUNTS, COUNTS, E, pid_t, E_P2, BM, False)
    t1 = _now()
    t2 = t1
    if e < E:
        rows = r0 + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        acc = _fp8_block_dot(
            A, SA, B + e_safe.to(tl.int64) * stride_be, SB + e_safe.to(tl.int64) * stride_sbe, rows, r1, pid_n * BN,
            N, K, 0, tl.cdiv(K, BK), stride_am, stride_sam, stride_bn, stride_sbn, EPS, BM, BN, BK, True, False, True,
        )  # fmt: skip
        acc = tl.trans(acc)
        t2 = _now()
        mask = (rows[:, None] < r1) & (cols[None, :] < N)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)
    t3 = _now()
    slot = (pid_t * tl.num_programs(1) + pid_n).to(tl.int64) * 6
    tl.store(TL + slot + 0, t0)
    tl.store(TL + slot + 1, t1)
    tl.store(TL + slot + 2, t2)
    tl.store(TL + slot + 3, t3)
    tl.store(TL + slot + 4, _smid().to(tl.int64))
    tl.store(TL + slot + 5, e.to(tl.int64))


def _launch(a, sa, w, ws, y, counts, tl_buf, cfg):
    e, n, k = w.shape
    grid = (-(-a.shape[0] // cfg.bm) + e, -(-n // cfg.bn))
    timed_kernel[grid](
        a, sa, w, ws, y, counts, tl_buf, e, n, k,
        a.stride(0), sa.stride(0), w.stride(0), w.stride(1), ws.stride(0), ws.stride(1), y.stride(0), 1e-12,
        E_P2=triton.next_power_of_2(e), BM=cfg.bm, BN=cfg.bn, BK=128,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _pct(sorted_values: torch.Tensor, q: float) -> float:
    return sorted_values[int(q * (len(sorted_values) - 1))].item()


def timeline(rec: torch.Tensor, nbytes: int, bw: float) -> dict:
    """rec [programs, 6] (ns stamps, SM, expert) of one launch -> the figures the docstring lists."""
    rec = rec.clone()
    rec[:, :4] -= rec[:, 0].min()  # ns from the first entry: small enough for float comparisons
    live = rec[rec[:, 5] < 128]
    t0 = rec[:, 0].min().item()
    end = rec[:, 3].max().item()
    span = (end - t0) / 1e3
    sms = sorted(set(rec[:, 4].tolist()))
    first_start = sorted(rec[rec[:, 4] == s, 0].min().item() for s in sms)
    last_end = sorted(rec[rec[:, 4] == s, 3].max().item() for s in sms)
    ramp = (first_start[int(0.9 * (len(sms) - 1))] - t0) / 1e3
    tail = (end - last_end[0]) / 1e3
    dur = ((live[:, 3] - live[:, 0]).float() / 1e3).sort().values
    tile_map = ((live[:, 1] - live[:, 0]).float() / 1e3).median().item()
    lo, hi = t0 + 0.1 * (end - t0), t0 + 0.9 * (end - t0)
    # each live program's bytes spread evenly over its run; the share that falls inside the middle 80%
    run = (live[:, 3] - live[:, 0]).clamp(min=1).double()
    inside = ((live[:, 3].clamp(max=hi) - live[:, 0].clamp(min=lo)).clamp(min=0).double() / run).sum().item()
    mid_rate = nbytes * inside / max(len(live), 1) / ((hi - lo) * 1e-9)
    # programs running at each tenth of the span (the waves and the tail)
    marks = [t0 + (i + 0.5) * (end - t0) / 10 for i in range(10)]
    running = "/".join(str(int(((live[:, 0] <= m) & (live[:, 3] > m)).sum())) for m in marks)
    return {
        "span us": span, "SMs": len(sms), "programs (live)": f"{len(rec)} ({len(live)})", "ramp us": ramp,
        "tail us": tail, "program us p50 / p90": f"{_pct(dur, 0.5):.1f} / {_pct(dur, 0.9):.1f}",
        "tile map us": tile_map, "x copy bw (span)": nbytes / (span * 1e-6) / bw,
        "x copy bw (middle 80%)": mid_rate / bw, "programs running, by tenths": running,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64])
    ap.add_argument(
        "--split",
        type=int,
        nargs="+",
        default=[1],
        help="also the same bytes as S x N by K / S (what split-K S would give each program)",
    )
    args = ap.parse_args()
    from bench.rollout import measured_bandwidth

    bw = measured_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy rate {bw / 1e12:.2f} TB/s")
    shapes = (("gate_up", 1536, 2048), ("down", 2048, 768))
    for b, (name, n, k), s in itertools.product(args.batch, shapes, args.split):
        if k % (128 * s) == 0:
            case(b, name if s == 1 else f"{name} as split {s}", n * s, k // s, bw)


def case(b: int, name: str, n: int, k: int, bw: float) -> None:
    """One GEMM at one batch: the real kernel and the stamped copy, each over 8 weight copies in a graph."""
    from miles_core.quant import fp8_block_quantize

    rows = 8 * b
    g = torch.Generator().manual_seed(b)
    counts = torch.bincount(torch.randint(0, 128, (rows,), generator=g), minlength=128).cuda()
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    a, sa = fp8_gemm.fp8_act_quant_triton(x)
    randn = lambda: torch.randn(128, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    copies = [fp8_block_quantize(randn()) for _ in range(8)]
    cfg = fp8_gemm.grouped_fp8_config(rows, 128)
    tiles = dict(bm=cfg.bm, bn=cfg.bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages, swap=cfg.swap)
    nbytes = int((counts > 0).sum()) * n * k
    y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    grid_programs = (-(-rows // cfg.bm) + 128) * -(-n // cfg.bn)
    recs = [torch.zeros(grid_programs, 6, dtype=torch.int64, device="cuda") for _ in copies]
    real = [
        lambda w=w, s=s: fp8_gemm.grouped_fp8_linear_triton(a, w, s, counts, x_scale=sa, out_dtype=y.dtype, **tiles)
        for w, s in copies
    ]
    pairs = zip(copies, recs, strict=True)
    timed = [lambda w=w, s=s, r=r: _launch(a, sa, w, s, y, counts, r, cfg) for (w, s), r in pairs]
    ref = real[0]()
    timed[0]()
    if not torch.equal(y, ref):
        print("note: the stamped copy's output differs from the kernel's in some bits")
    us_real, us_timed = graph_us(_cycle(real), calls=16), graph_us(_cycle(timed), calls=16)
    print(f"\n{name}, batch {b} ({rows} rows, {nbytes / 1e6:.0f} MB of touched weights): kernel {us_real:.1f} us "
          f"({nbytes / (us_real * 1e-6) / bw:.2f}x copy), stamped copy {us_timed:.1f} us")  # fmt: skip
    print("| launch | " + " | ".join(timeline(recs[0].cpu(), nbytes, bw)) + " |")
    print("|---" * 11 + "|")
    for i, r in enumerate(recs[:4]):  # the graph's last replay wrote each copy's record
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in timeline(r.cpu(), nbytes, bw).values()]
        print(f"| {i} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
