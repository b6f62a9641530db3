"""Decode-size kernels of the rollout step, each against the torch ops it replaces (CUDA graphs).

    PYTHONPATH=. python bench/decode_kernels.py [--sweep]

Qwen3-30B-A3B MoE layer shapes (hidden 2048, 128 experts, top-8, expert hidden 768) at decode
batches of 64 and 256 tokens. Each variant is captured in a CUDA graph of 20 calls and replayed
(what the engine's decode graph does), median of 10 replays per call.

- routing: the softmax router's top-k + the sort by expert (`Router.forward` + the argsort
  dispatch: ~15 small kernels) vs `moe_route.topk_route` (two launches; `--sweep`: tile configs).
- grouped GEMM: the experts' gate_up [128, 1536, 2048] and down [128, 2048, 768] bf16 GEMMs over the
  sorted rows: torch._grouped_mm (with its offsets cumsum) vs `grouped_triton` (`--sweep`: tiles),
  as bandwidth over the touched experts' weight bytes against a measured device copy.
- dense: the "fp8" engine's FP8 attention projections (q/k/v fused, o_proj) against bf16 cuBLAS, the
  kernel alone on pre-quantized rows by tile (`--sweep`).
- flash_decode: the GQA decode attention for several split targets (`TARGET_PROGRAMS`).
- addnorm: the residual add + next RMSNorm (`x + a`, F.rms_norm) and the MoE's combine + add + norm
  (`moe_combine.combine`, `x + c`, F.rms_norm) vs `add_norm.add_rms_norm` / `combine_add_rms_norm`.
- experts: the MoE experts' launch fusions (row gather, SwiGLU) vs the launches they replace
  (bench/decode_experts.py).
- gluon: the grouped FP8 expert GEMMs on pre-quantized rows, the Triton decode kernel (its default tiles) against
  the persistent TMA-fed Gluon kernel (`fp8_wgmma_grouped`) over its tile options, bits compared.
- rope: `rope_cache.rope_norm_cache` (q/k norm + rope + KV-cache write, 32 q / 4 KV heads of 128) at the
  decode batches and at a prefill chunk of 32,768 rows, by heads per program (bits compared with one
  head per program), against the bytes it moves at the measured copy rate.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics

import torch


def graph_us(fn, calls: int = 20, reps: int = 10) -> float:
    """Median microseconds per call of `fn` replayed from a CUDA graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def bandwidth() -> float:
    """Device copy bandwidth, bytes read + written per second (a 4 GiB copy_ outside any graph: inside
    one, torch's device copy becomes a copy-engine memcpy node, much slower)."""
    from bench.rollout import measured_bandwidth

    return measured_bandwidth()


def routing(batches, sweep: bool) -> None:
    from bench.common import QWEN3_30B_A3B
    from miles_core.kernels import moe_route
    from miles_core.model.config import ModelConfig
    from miles_core.model.moe import Router

    router = Router(ModelConfig.from_hf(dict(QWEN3_30B_A3B, num_hidden_layers=1))).cuda().bfloat16()
    torch.nn.init.normal_(router.weight, std=0.02)
    print("\n| routing (top-8 of 128) | tokens | us per layer | vs torch |")
    print("|---|---|---|---|")
    sweep_tiles = list(itertools.product((1, 2, 4, 8), (2, 4, 8))) if sweep else []
    for n in batches:
        x = torch.randn(n, 2048, device="cuda", dtype=torch.bfloat16)
        logits = torch.nn.functional.linear(x, router.weight)
        torch_path = _torch_routing(router, x)
        base, want = graph_us(torch_path), torch_path()
        lin = graph_us(lambda x=x: torch.nn.functional.linear(x, router.weight))
        print(f"| torch (linear + softmax/topk/.. + argsort sort) | {n} | {base:.1f} | 1.00x |")
        print(f"| the router GEMM alone (in both) | {n} | {lin:.1f} | - |")
        for tile in [None, *sweep_tiles]:
            run = _kernel_routing(logits, tile)
            ok = all(torch.equal(a, b) for a, b in zip(run()[2], want, strict=True))
            us = graph_us(run)
            name = f"kernel {tile or moe_route.CONFIG}" + ("" if ok else " (plan differs: ties?)")
            print(f"| {name} + GEMM | {n} | {us + lin:.1f} | {base / (us + lin):.2f}x |")


def _torch_routing(router, x):
    from miles_core.kernels import moe_route

    def run():
        _, experts = router(x)
        return moe_route.sort_route_reference(experts, 128)

    return run


def _kernel_routing(logits, tile):
    from miles_core.kernels import moe_route

    return lambda: moe_route.topk_route(logits, 8, True, 1.0, torch.bfloat16, tile=tile)


def grouped(batches, sweep: bool, bw: float) -> None:
    from miles_core.kernels import grouped_triton

    print(f"\n| grouped GEMM (bf16) | rows | us | GB/s | x copy bw ({bw / 1e9:.0f} GB/s) | rel err vs _grouped_mm |")
    print("|---|---|---|---|---|---|")
    for n_tok, (name, n, k) in itertools.product(batches, (("gate_up", 1536, 2048), ("down", 2048, 768))):
        rows = n_tok * 8
        g = torch.Generator().manual_seed(n_tok)
        experts = torch.randint(0, 128, (rows,), generator=g)
        counts = torch.bincount(experts, minlength=128).cuda()
        touched = int((counts > 0).sum())
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(128, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        nbytes = touched * n * k * 2

        cutlass = _cutlass(x, w, counts)
        ref = cutlass()
        base = graph_us(cutlass)
        print(f"| {name} torch._grouped_mm | {rows} | {base:.1f} | {nbytes / base / 1e3:.0f} | "
              f"{nbytes / (base * 1e-6) / bw:.2f} | - |")  # fmt: skip
        configs = [None]
        if sweep:
            configs += [
                dict(BM=16, BN=bn, BK=bk, num_warps=nw, num_stages=st)
                for bn, bk, nw, st in itertools.product((64, 128), (64, 128), (4, 8), (3, 5))
            ]
        for cfg in configs:
            run = _triton_grouped(x, w, counts, cfg)
            with torch.inference_mode():
                got, us = run(), graph_us(run)
            err = float((got.float() - ref.float()).norm() / ref.float().norm())
            label = cfg or grouped_triton.CONFIG
            print(f"| {name} triton {label} | {rows} | {us:.1f} | {nbytes / us / 1e3:.0f} | "
                  f"{nbytes / (us * 1e-6) / bw:.2f} | {err:.1e} |")  # fmt: skip


def _cutlass(x, w, counts):
    return lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.cumsum(counts, 0, dtype=torch.int32))


def _triton_grouped(x, w, counts, cfg):
    from miles_core.kernels import grouped_triton

    return lambda: grouped_triton.grouped_linear_triton(x, w, counts, cfg)


def fp8_grouped(batches, bw: float) -> None:
    """The grouped FP8 expert GEMM (act-quant + `grouped_fp8_kernel`) over its tile options, against
    the bf16 Triton kernel on the same rows, as bandwidth over the touched experts' fp8 weights."""
    from miles_core.kernels import fp8_gemm, grouped_triton
    from miles_core.quant import fp8_block_quantize

    cols = f"| rows | tiles (bm, bn, warps, stages, swap, K blocks per step) | us | GB/s | x copy bw ({bw / 1e9:.0f}) "
    cols += "| rel err |"
    print("\n| grouped FP8 " + cols)
    print("|---|---|---|---|---|---|---|")
    # earlier sweeps (bench/RESULTS.md): 16-row swapped tiles best; 16-row tiles on mma.sync (swap False),
    # 32-row tiles, 2 warps and 5-6 stages no better. Now: two K blocks per loop iteration (ku = 2)
    options = [(16, 64, 4, 3, True, 1), (16, 64, 4, 5, True, 1), (64, 128, 4, 3, False, 1)]
    options += [(16, 64, 4, st, True, 2) for st in (2, 3, 4)] + [(16, 128, 4, st, True, 2) for st in (2, 3)]
    options += [(16, 64, 8, 3, True, 2), (16, 128, 4, 3, False, 2), (16, 64, 4, 3, False, 2), (64, 128, 4, 3, False, 2)]
    for n_tok, (name, n, k) in itertools.product(batches, (("gate_up", 1536, 2048), ("down", 2048, 768))):
        rows = n_tok * 8
        g = torch.Generator().manual_seed(n_tok)
        counts = torch.bincount(torch.randint(0, 128, (rows,), generator=g), minlength=128).cuda()
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        wq, ws = fp8_block_quantize(torch.randn(128, n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        nbytes = int((counts > 0).sum()) * n * k
        with torch.inference_mode():
            ref = grouped_triton.grouped_linear_triton(x, fp8_gemm.fp8_block_dequantize(wq, ws).bfloat16(), counts)
        for opt in dict.fromkeys(options):
            bm, bn, nw, st, swap, ku = opt
            cfg = dict(bm=bm, bn=bn, num_warps=nw, num_stages=st, swap=swap, ku=ku)
            run = _fp8_run(fp8_gemm, x, wq, ws, counts, cfg)
            try:
                with torch.inference_mode():
                    err = float((run().float() - ref.float()).norm() / ref.float().norm())
                    us = graph_us(run)
            except Exception as exc:  # a tile the compiler refuses
                print(f"| {name} | {rows} | {opt} | failed: {type(exc).__name__} | | | |")
                continue
            print(f"| {name} | {rows} | {opt} | {us:.1f} | {nbytes / us / 1e3:.0f} | "
                  f"{nbytes / (us * 1e-6) / bw:.2f} | {err:.1e} |", flush=True)  # fmt: skip
        if name == "gate_up":
            _swiglu_epilogue(fp8_gemm, x, wq, ws, counts, nbytes, bw)


def fp8_grouped_gluon(batches, bw: float) -> None:
    """The decode expert GEMMs on FP8 rows quantized before: the Triton kernel with its decode tiles against
    the persistent Gluon kernel (a TMA ring of weight tiles per SM that does not drain between tiles) by tile,
    as bandwidth over the touched experts' fp8 weights; each output against the fp32 reference."""
    from miles_core.kernels.fp8_wgmma_grouped import GroupedConfig

    print(f"\n| GEMM | rows | kernel | us | GB/s | x copy bw ({bw / 1e9:.0f}) | rel err |")
    print("|---|---|---|---|---|---|---|")
    # the prefill kernel (rows on wgmma's M side): 64 x 256 tiles were its best at 512 and 2,048 rows, 0.89-0.92x
    # of the copy rate on gate_up (64 x 128: 0.74-0.83x; bench/RESULTS.md, seventeenth session)
    cfgs = [GroupedConfig(64, 256, 3, 8), GroupedConfig(128, 256, 4, 8)]
    for n_tok, (name, n, k) in itertools.product(batches, (("gate_up", 1536, 2048), ("down", 2048, 768))):
        _gluon_case(name, n_tok * 8, n, k, cfgs, bw)


def _gluon_case(name: str, rows: int, n: int, k: int, cfgs, bw: float) -> None:
    from miles_core.kernels import fp8_gemm, fp8_wgmma_decode, fp8_wgmma_grouped
    from miles_core.quant import fp8_block_quantize

    g = torch.Generator().manual_seed(rows)
    counts = torch.bincount(torch.randint(0, 128, (rows,), generator=g), minlength=128).cuda()
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    a, sa = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)  # [M4, K] e4m3, [M4, K/128]
    a, sa_rows = a[:rows], sa[:rows].contiguous()
    wq, ws = fp8_block_quantize(torch.randn(128, n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    nbytes = int((counts > 0).sum()) * n * k
    ref = fp8_wgmma_grouped.grouped_fp8_block_gemm_reference(a, sa_rows, wq, ws, counts, torch.float32)
    t = fp8_gemm.grouped_fp8_config(rows, 128)
    tiles = dict(bm=t.bm, bn=t.bn, num_warps=t.num_warps, num_stages=t.num_stages, swap=t.swap)
    runs = {
        f"Triton {t.bm}x{t.bn} w{t.num_warps} s{t.num_stages}": lambda: fp8_gemm.grouped_fp8_linear_triton(
            a, wq, ws, counts, x_scale=sa_rows, out_dtype=torch.bfloat16, **tiles
        )
    }
    for d in fp8_wgmma_decode.decode_configs():
        runs[f"Gluon decode {d.consumers}x64 w, {d.block_r} rows, s{d.stages}, {d.ctas} CTA/SM"] = lambda d=d: (
            fp8_wgmma_decode.grouped_fp8_decode_gemm(a, sa, wq, ws, counts, config=d)
        )
    from miles_core.quant.fp8 import tile_fp8_weights

    wt = tile_fp8_weights(wq)  # (64-row slice, K block) boxes, each 8 KB contiguous
    runs[f"Triton {t.bm}x{t.bn} w{t.num_warps} s{t.num_stages}, tiled w"] = lambda: fp8_gemm.grouped_fp8_linear_triton(
        a, wt, ws, counts, x_scale=sa_rows, out_dtype=torch.bfloat16, tiled=True, **tiles
    )
    for st in (4, 5):
        alt = {**tiles, "num_stages": st}
        runs[f"Triton {t.bm}x{t.bn} w{t.num_warps} s{st}, tiled w"] = lambda alt=alt: (
            fp8_gemm.grouped_fp8_linear_triton(
                a, wt, ws, counts, x_scale=sa_rows, out_dtype=torch.bfloat16, tiled=True, **alt
            )
        )
    for d in fp8_wgmma_decode.decode_configs():
        label = f"Gluon decode {d.consumers}x64 w, {d.block_r} rows, s{d.stages}, {d.ctas} CTA/SM, tiled w"
        runs[label] = lambda d=d: fp8_wgmma_decode.grouped_fp8_decode_gemm(a, sa, wt, ws, counts, config=d, tiled=True)
    for c in cfgs:
        extra = ("" if c.fence else " nofence") + ("" if c.coalesce else " regstore")
        runs[f"Gluon {c.block_m}x{c.block_n} s{c.stages}{extra}"] = lambda c=c: (
            fp8_wgmma_grouped.grouped_fp8_block_gemm(a, sa, wq, ws, counts, config=c)
        )
        runs[f"Gluon {c.block_m}x{c.block_n} s{c.stages}{extra}, tiled w"] = lambda c=c: (
            fp8_wgmma_grouped.grouped_fp8_block_gemm(a, sa, wt, ws, counts, config=c, tiled=True)
        )
    for label, run in runs.items():
        try:
            err = float((run().float() - ref).norm() / ref.norm())
            us = graph_us(run)
        except Exception as exc:  # a tile that does not compile or launch is a row of the table
            print(f"| {name} | {rows} | {label} | failed: {type(exc).__name__}: {str(exc)[:120]} | | | |")
            continue
        print(f"| {name} | {rows} | {label} | {us:.1f} | {nbytes / us / 1e3:.0f} | "
              f"{nbytes / (us * 1e-6) / bw:.2f} | {err:.1e} |", flush=True)  # fmt: skip


def fp8_dense(batches, sweep: bool, bw: float) -> None:
    """The "fp8" engine's attention projections at decode: the fused q/k/v (5120 x 2048) and o_proj (2048 x
    4096) of Qwen3-30B-A3B on FP8 weights, 8 weight copies rotating (beyond the L2), against bf16 `x @ w.t()`
    (cuBLAS) on the same rows: the default (act-quant + `fp8_dense_kernel`) and the kernel alone on rows
    quantized before (what a norm that quantizes its output leaves), by tile (`--sweep`)."""
    from miles_core.kernels import fp8_gemm
    from miles_core.quant import fp8_block_quantize

    print(f"\n| dense FP8 | rows | path (bm, bn, warps, stages, split, K blocks per step) | us | x bf16 | "
          f"x copy bw ({bw / 1e9:.0f}) | rel err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    options = [(64, 64, 4, 4, 1, 1), (64, 64, 4, 4, 4, 1)]  # the default's tiles for q/k/v, o_proj
    if sweep:  # deeper pipelines, narrower N tiles (more programs), two K blocks per step
        options += [(64, bn, 4, st, sp, 1) for bn in (32, 64) for st in (6, 8) for sp in (1, 2, 4)]
        options += [(64, 32, 4, 4, sp, 1) for sp in (1, 2, 4)] + [(64, 16, 4, st, 1, 1) for st in (4, 8)]
        options += [(64, bn, 4, st, sp, 2) for bn in (32, 64) for st in (3, 4) for sp in (1, 2)]
        options += [(64, 64, 8, 6, 1, 1), (64, 64, 8, 6, 2, 1)]
    for b, (name, n, k) in itertools.product(batches, (("q/k/v fused", 5120, 2048), ("o_proj", 2048, 4096))):
        x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        qs = [fp8_block_quantize(w) for w in ws]
        nbytes = n * k
        ref = fp8_gemm.fp8_linear_reference(x, *qs[0]).float()
        base = graph_us(_cycle([lambda w=w, x=x: x @ w.t() for w in ws]))
        print(f"| {name} | {b} | bf16 cuBLAS | {base:.1f} | 1.00 | {2 * nbytes / (base * 1e-6) / bw:.2f} | |")
        xq = fp8_gemm.fp8_act_quant_triton(x)
        us = graph_us(lambda x=x: fp8_gemm.fp8_act_quant_triton(x))
        print(f"| {name} | {b} | act-quant alone | {us:.1f} | | | |")
        default = fp8_gemm.dense_fp8_config(b, n, k)
        us = graph_us(_cycle([lambda q=q, x=x, c=default: fp8_gemm.fp8_dense_triton(x, *q, c) for q in qs]))
        print(f"| {name} | {b} | default, act-quant + kernel {default} | {us:.1f} | {base / us:.2f} | "
              f"{nbytes / (us * 1e-6) / bw:.2f} | |", flush=True)  # fmt: skip
        for bm, bn, nw, st, sp, ku in dict.fromkeys(options):
            cfg = fp8_gemm.Fp8Config(bm=bm, bn=bn, num_warps=nw, num_stages=st, split_k=sp, ku=ku)
            runs = [lambda q=q, x=x, c=cfg, xq=xq: fp8_gemm.fp8_dense_triton(x, *q, c, xq=xq) for q in qs]
            try:
                err = float((runs[0]().float() - ref).norm() / ref.norm())
                us = graph_us(_cycle(runs))
            except Exception as exc:  # a tile the compiler refuses (shared memory)
                print(f"| {name} | {b} | {(bm, bn, nw, st, sp, ku)} | failed: {type(exc).__name__} | | | |")
                continue
            print(f"| {name} | {b} | on fp8 rows {(bm, bn, nw, st, sp, ku)} | {us:.1f} | {base / us:.2f} | "
                  f"{nbytes / (us * 1e-6) / bw:.2f} | {err:.1e} |", flush=True)  # fmt: skip


def _cycle(fns):
    """One callable that runs fns in turn (each graph call its own weight copy)."""
    it = itertools.cycle(fns)
    return lambda: next(it)()


def _fp8_run(fp8_gemm, x, wq, ws, counts, cfg):
    return lambda: fp8_gemm.grouped_fp8_linear_triton(x, wq, ws, counts, **cfg)


def _swiglu_epilogue(fp8_gemm, x, wq, ws, counts, nbytes: int, bw: float) -> None:
    """gate_up on pre-quantized rows then SwiGLU + act-quant (two launches) vs the SwiGLU and its
    act-quant in the GEMM's epilogue (128-wide tiles: gate and up columns of one 1x128 output tile)."""
    rows = x.shape[0]
    with torch.inference_mode():
        a, sa = fp8_gemm.fp8_act_quant(x)
    common = dict(x_scale=sa, out_dtype=torch.bfloat16, bm=16, swap=True)
    cfg = fp8_gemm.grouped_fp8_config(rows, counts.numel())
    two = lambda: fp8_gemm.swiglu_fp8_quant_triton(  # noqa: E731  (the decode default's two launches)
        fp8_gemm.grouped_fp8_linear_triton(
            a, wq, ws, counts, bn=64, num_warps=cfg.num_warps, num_stages=cfg.num_stages, ku=cfg.ku, **common
        )  # fmt: skip
    )
    with torch.inference_mode():
        q2, s2 = two()
        us = graph_us(two)
    print(f"| gate_up (bn 64, {cfg.num_warps} warps, {cfg.num_stages} stages) + swiglu-quant | {rows} | - | {us:.1f} "
          f"| {nbytes / us / 1e3:.0f} | {nbytes / (us * 1e-6) / bw:.2f} | |", flush=True)  # fmt: skip
    # the epilogue's tiles (ku, stages, warps): each program runs its 128 gate rows, then its 128 up rows
    for ku, st, nw in ((1, 2, 4), (1, 3, 4), (1, 4, 4), (1, 3, 8), (1, 4, 8), (2, 2, 4), (2, 2, 8)):
        tiles = dict(ku=ku, num_stages=st, num_warps=nw)
        one = lambda t=tiles: fp8_gemm.grouped_fp8_linear_triton(  # noqa: E731
            a, wq, ws, counts, bn=128, swiglu_quant=True, **common, **t
        )
        try:
            with torch.inference_mode():
                q1, s1 = one()
                same = torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
                us = graph_us(one)
        except Exception as exc:  # a tile the compiler refuses (shared memory)
            print(f"| epilogue ku {ku}, {st} stages, {nw} warps | {rows} | failed: {type(exc).__name__} | | | | |")
            continue
        print(f"| gate_up with swiglu-quant epilogue (bn 128), ku {ku}, {st} stages, {nw} warps | {rows} | "
              f"bitwise {same} | {us:.1f} | {nbytes / us / 1e3:.0f} | {nbytes / (us * 1e-6) / bw:.2f} | |",
              flush=True)  # fmt: skip


def flash(batches, bw: float) -> None:
    """flash_decode at the rollout bench's shape (32 q / 4 KV heads, head dim 128, each row's length
    uniform in [512, 1024]) for several split targets (`TARGET_PROGRAMS`), as bandwidth over the
    K/V bytes the rows attend."""
    from miles_core.rollout import flash_decode as fd

    print(f"\n| flash_decode | batch | target programs | splits | us | GB/s | x copy bw ({bw / 1e9:.0f} GB/s) |")
    print("|---|---|---|---|---|---|---|")
    default = fd.TARGET_PROGRAMS
    for b in batches:
        g = torch.Generator().manual_seed(b)
        lengths = torch.randint(512, 1025, (b,), generator=g).cuda()
        q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b + 1, 1025, 4, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        slots = torch.arange(b, device="cuda")
        nbytes = int(lengths.sum()) * 4 * 128 * 2 * 2
        ref = fd.flash_decode_reference(q, k, v, slots, lengths, 128**-0.5, 1024)
        for target in (256, 512, 1024, 2048, 4096):
            fd.TARGET_PROGRAMS = target
            run = _flash(fd, q, k, v, slots, lengths)
            err = float((run().float() - ref.float()).abs().max())
            us = graph_us(run)
            nsplit = fd.splits_for(b, 4, 1024)[0]
            print(f"| err {err:.1e} | {b} | {target} | {nsplit} | {us:.1f} | {nbytes / us / 1e3:.0f} | "
                  f"{nbytes / (us * 1e-6) / bw:.2f} |")  # fmt: skip
        fd.TARGET_PROGRAMS = default


def _flash(fd, q, k, v, slots, lengths):
    return lambda: fd.flash_decode(q, k, v, slots, lengths, 128**-0.5, 1024)


def sampling(batches, sweep: bool, bw: float) -> None:
    """`sample()` on bf16 logits [rows, 151936], greedy and T = 1: the torch path (float copy,
    log_softmax, argmax or cumsum + searchsorted, the uniform's int64 ops) vs the `kernels.sampler`
    launches (`--sweep`: chunk and warps), as bandwidth over one read of the logits."""
    from miles_core import kernels
    from miles_core.kernels import sampler
    from miles_core.rollout.sampling import SamplingParams, SamplingTensors, sample

    v = 151936
    print(f"\n| sampling (V = {v}, bf16) | rows | T | us | GB/s of one logits read | x copy bw | vs torch |")
    print("|---|---|---|---|---|---|---|")
    configs = [sampler.CONFIG]
    if sweep:
        configs += [c for c in itertools.product((1024, 2048, 4096, 8192), (4, 8), (4, 8)) if c != sampler.CONFIG]
    for n, t in itertools.product(batches, (0.0, 1.0)):
        logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16) * 4
        st = SamplingTensors([SamplingParams(temperature=t)] * n, list(range(n)), [0] * n, "cuda")
        nbytes = logits.numel() * 2
        base = graph_us(_torch_sample(kernels, sample, logits, st))
        print(f"| torch sample() | {n} | {t} | {base:.1f} | {nbytes / base / 1e3:.0f} | "
              f"{nbytes / (base * 1e-6) / bw:.2f} | 1.00x |")  # fmt: skip
        for cfg in configs:
            us = graph_us(_kernel_sample(sampler, logits, st, cfg))
            print(f"| kernels {cfg} | {n} | {t} | {us:.1f} | {nbytes / us / 1e3:.0f} | "
                  f"{nbytes / (us * 1e-6) / bw:.2f} | {base / us:.2f}x |")  # fmt: skip


def _kernel_sample(sampler, logits, st, cfg):
    return lambda: sampler.sample_plain(logits, st.temperature, st.seed, st.step, cfg)


def _torch_sample(kernels, sample, logits, st):
    def run():
        fused, kernels.DECODE_FUSION = kernels.DECODE_FUSION, False  # read at each call: the graph gets torch ops
        try:
            return sample(logits, st)
        finally:
            kernels.DECODE_FUSION = fused

    return run


def addnorm(batches) -> None:
    """The layer-boundary launches the fused decode loop replaces, bf16, top-8: post-attention (add,
    norm: 2 launches -> 1) and after the experts (combine, add, norm: 3 -> 1), at hidden 2048
    (Qwen3-30B-A3B) and 7168 (DeepSeek-V3). `s equal`: the fused sums have the unfused bits."""
    print("\n| add + RMSNorm (bf16) | tokens | H | torch us | fused us | vs torch | s equal |")
    print("|---|---|---|---|---|---|---|")
    for n, h in itertools.product(batches, (2048, 7168)):
        for name, unfused, fused in _addnorm_cases(n, h):
            same = torch.equal(unfused()[0], fused()[0])
            base, us = graph_us(unfused), graph_us(fused)
            print(f"| {name} | {n} | {h} | {base:.1f} | {us:.1f} | {base / us:.2f}x | {same} |")


def _addnorm_cases(n: int, h: int) -> list:
    """(name, torch ops, fused kernel) pairs on random bf16 rows: n tokens of h, 8 slots each."""
    import torch.nn.functional as F

    from miles_core.kernels import add_norm, moe_combine

    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, a, w = torch.randn(n, h, **bf), torch.randn(n, h, **bf), torch.rand(h, **bf) + 0.5
    ys, inverse, weights = torch.randn(n * 8, h, **bf), torch.randperm(n * 8, device="cuda"), torch.rand(n, 8, **bf)

    def add_norm_torch(r):
        s = x + r
        return s, F.rms_norm(s, (h,), w, 1e-6)

    return [
        ("add, norm", lambda: add_norm_torch(a), lambda: add_norm.add_rms_norm(x, a, w, 1e-6)),
        (
            "combine, add, norm",
            lambda: add_norm_torch(moe_combine.combine(ys, inverse, weights)),
            lambda: add_norm.combine_add_rms_norm(ys, inverse, weights, x, w, 1e-6),
        ),
    ]


def rope(batches, bw: float) -> None:
    from miles_core.kernels import rope_cache as rc

    hq, hkv, d = 32, 4, 128
    print("\n| rows | heads per program | us | x copy floor | same bits as 1 |\n|---|---|---|---|---|")
    for rows in [*batches, 32768]:
        g = torch.Generator(device="cuda").manual_seed(0)
        bf = dict(device="cuda", dtype=torch.bfloat16)
        q, k, v = (torch.randn(rows, h * d, generator=g, **bf) for h in (hq, hkv, hkv))
        w = torch.rand(d, generator=g, **bf) + 0.5
        ang = torch.rand(rows, d, generator=g, device="cuda") * 7
        cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()
        ck, cv = torch.zeros(rows + 1, 1, hkv, d, **bf), torch.zeros(rows + 1, 1, hkv, d, **bf)  # a slot per row
        slot, pos = torch.arange(rows, device="cuda"), torch.zeros(rows, dtype=torch.long, device="cuda")
        k_out = torch.empty(rows, hkv, d, **bf) if rows > 256 else None
        moved = 2 * (q.numel() + k.numel() + v.numel()) * 2 + (k.numel() * 2 if k_out is not None else 0)
        floor_us = moved / bw * 1e6  # bw counts bytes read + written, as `moved` does
        first = None
        for hpp in (1, 2, 4, 6, 9, 12):
            fn = functools.partial(rc.rope_norm_cache, q, k, v, w, w, 1e-6, cos, sin, ck, cv, slot, pos, k_out, hpp=hpp)
            bits = (fn().clone(), ck.clone(), k_out.clone() if k_out is not None else None)
            first = first or bits
            same = all(a is None or torch.equal(a, b) for a, b in zip(first, bits, strict=True))
            us = graph_us(fn, calls=5 if rows > 256 else 20)
            print(f"| {rows} | {hpp}{' (default)' if hpp == rc.heads_per_program(rows, hq + hkv) else ''} | "
                  f"{us:.1f} | {us / floor_us:.2f} | {same} |", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--sweep", action="store_true", help="also time the tile configurations")
    parts = ["routing", "grouped", "flash", "fp8", "gluon", "dense", "sampling", "addnorm", "experts", "rope"]
    ap.add_argument("--only", choices=parts, default=None)
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw = bandwidth()
    with torch.inference_mode():
        if args.only in (None, "routing"):
            routing(args.batch, args.sweep)
    if args.only in (None, "grouped"):
        grouped(args.batch, args.sweep, bw)
    if args.only in (None, "flash"):
        flash(args.batch, bw)
    if args.only in (None, "fp8"):
        fp8_grouped(args.batch, bw)
    if args.only in (None, "gluon"):
        with torch.inference_mode():
            fp8_grouped_gluon(args.batch, bw)
    if args.only in (None, "dense"):
        with torch.inference_mode():
            fp8_dense(args.batch, args.sweep, bw)
    if args.only in (None, "sampling"):
        with torch.inference_mode():
            sampling(args.batch, args.sweep, bw)
    if args.only in (None, "addnorm"):
        with torch.inference_mode():
            addnorm(args.batch)
    if args.only in (None, "experts"):
        from bench.decode_experts import experts

        experts(args.batch, args.sweep)
    if args.only in (None, "rope"):
        with torch.inference_mode():
            rope(args.batch, bw)


if __name__ == "__main__":
    main()
