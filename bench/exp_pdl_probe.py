"""Scratch: is programmatic dependent launch active (eager and inside a CUDA graph), and what does it save
per launch on a chain of small kernels? Run on the device; removed after (bench/RESULTS.md has the figures)."""

import statistics

import torch
import triton
import triton.language as tl

from miles_core import kernels
from miles_core.kernels import add_norm
from miles_core.kernels.pdl import pdl_enter, pdl_wait


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def spin_kernel(T, NS, PDL: tl.constexpr):
    pdl_enter(PDL)
    t0 = _now()
    t = t0
    while t - t0 < NS:
        t = _now()
    if tl.program_id(0) == 0:
        tl.store(T + 0, t)


@triton.jit
def probe_kernel(T, PDL: tl.constexpr):
    t_in = _now()
    pdl_wait(PDL)
    t_go = _now()
    if tl.program_id(0) == 0:
        tl.store(T + 1, t_in)
        tl.store(T + 2, t_go)


def probe(graph: bool, on: bool) -> tuple[float, float]:
    t = torch.zeros(3, dtype=torch.int64, device="cuda")
    kw = {"PDL": True, "launch_pdl": True} if on else {"PDL": False}

    def run():
        spin_kernel[(1,)](t, 20000, **kw)
        probe_kernel[(1,)](t, **kw)

    run()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        g.replay()
    else:
        run()
    torch.cuda.synchronize()
    a_end, b_in, b_go = t.tolist()
    return (b_in - a_end) / 1e3, (b_go - a_end) / 1e3  # us, negative: B started before A ended


def chain(on: bool, n: int = 64, calls: int = 10) -> float:
    kernels.PDL = on
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(2048, device="cuda", dtype=torch.bfloat16)

    def run():
        y = x
        for _ in range(n):
            y, _h = add_norm.add_rms_norm(y, x, w, 1e-6)

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            run()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / (n * calls))
    kernels.PDL = False
    return statistics.median(times)


if __name__ == "__main__":
    print("| mode | PDL | B entered - A ended (us) | B past its wait - A ended (us) |")
    print("|---|---|---|---|")
    for graph in (False, True):
        for on in (False, True):
            b_in, b_go = probe(graph, on)
            print(f"| {'graph' if graph else 'eager'} | {on} | {b_in:.2f} | {b_go:.2f} |")
    print("\n| chain of 64 add_rms_norm (64 x 2048) in a graph | us per launch |")
    print("|---|---|")
    for on in (False, True, False, True):
        print(f"| PDL {on} | {chain(on):.2f} |")
