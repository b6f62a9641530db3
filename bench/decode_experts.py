"""The MoE experts' launch fusions at decode sizes, each against the launches it replaces (CUDA graphs).

    PYTHONPATH=. python bench/decode_kernels.py --only experts [--sweep] [--batch 64 256]

Qwen3-30B-A3B expert shapes (hidden 2048, 128 experts, top-8, expert hidden 768), rows routed by a
random top-8 and sorted as the model sorts them. Timed as in bench/decode_kernels.py (a CUDA graph of
20 calls, median of 10 replays). Every fused row also says whether its output equals the unfused
launches' bit for bit (it should: `kernels.EXPERT_FUSION` changes only the launches).

- bf16: index_select + grouped GEMM vs the gather in the GEMM; gate_up GEMM + `swiglu` vs the SwiGLU
  epilogue (`--sweep`: its BN and stages); the whole `Experts.sorted_forward` with the fusions off / on.
- FP8: index_select + act-quant vs act-quant of the gathered rows; `swiglu` + act-quant vs the one
  SwiGLU + act-quant kernel; the whole expert MLP (index_select, act-quant, gate_up, swiglu, act-quant,
  down) vs `fp8_gemm.grouped_fp8_experts` (act-quant(gather), gate_up, swiglu+act-quant, down).
- INT4: index_select + grouped W4A16 gate_up vs the gather in the kernel.
"""

from __future__ import annotations

import itertools

import torch

from bench.decode_kernels import graph_us
from miles_core import kernels

HIDDEN, INTER, E, TOP_K = 2048, 768, 128, 8


def _flagged(fn, on: bool):
    def run():  # the flag is read at each call: the graph captures that path's kernels
        with kernels.fusion(experts=on):
            return fn()

    return run


def _inputs(tokens: int):
    """-> (x [T, H] bf16, src [T*k], counts [E]): rows of a random top-8, sorted as the model sorts them."""
    from miles_core.kernels import moe_route

    g = torch.Generator().manual_seed(tokens)
    experts = torch.rand(tokens, E, generator=g).topk(TOP_K, dim=-1)[1].cuda()  # [T, k]
    src, _, counts = moe_route.sort_route(experts, E)
    return torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16), src, counts


def _time(table: str, tokens: int, variants) -> None:
    """variants: [(name, fn)], the first the baseline; every other output compared with its bits."""
    want, base = _bits(variants[0][1]()), graph_us(variants[0][1])
    for i, (name, fn) in enumerate(variants):
        us = base if i == 0 else graph_us(fn)
        same = "-" if i == 0 else ("yes" if torch.equal(_bits(fn()), want) else "NO")
        print(f"| {table} | {tokens} | {name} | {us:.1f} | {base / us:.2f}x | {same} |", flush=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def bf16(tokens: int, layer, sweep: bool) -> None:
    from miles_core.kernels.grouped_triton import CONFIG, SWIGLU_CONFIG, grouped_linear_triton
    from miles_core.kernels.swiglu import swiglu

    x, src, counts = _inputs(tokens)
    w1 = layer.gate_up_proj  # [E, 2I, H]
    gather = [
        ("index_select + GEMM", lambda: grouped_linear_triton(x.index_select(0, src), w1, counts)),
        ("GEMM gathering its rows", lambda: grouped_linear_triton(x, w1, counts, src=src)),
    ]
    _time("bf16 gate_up: gather", tokens, gather)
    act = [("index_select + GEMM + swiglu", lambda: swiglu(grouped_linear_triton(x.index_select(0, src), w1, counts)))]
    configs = [SWIGLU_CONFIG]
    if sweep:  # BN gate columns (and as many up columns) per program
        configs += [dict(CONFIG, BN=bn, num_stages=st) for bn, st in itertools.product((32, 64, 128), (3, 4))]
    for cfg in [dict(c) for c in dict.fromkeys(tuple(c.items()) for c in configs)]:
        name = f"gather + GEMM + SwiGLU epilogue, BN {cfg['BN']} stages {cfg['num_stages']}"
        act.append((name, lambda cfg=cfg: grouped_linear_triton(x, w1, counts, cfg, src=src, swiglu=True)))
    _time("bf16 gate_up: SwiGLU", tokens, act)
    whole = [(f"Experts.sorted_forward, EXPERT_FUSION {on}", _flagged(lambda: layer.sorted_forward(x, counts, src), on))
             for on in (False, True)]  # fmt: skip
    _time("bf16 experts: gate_up, act, down", tokens, whole)


def fp8(tokens: int, w1, s1, w2, s2) -> None:
    from miles_core.kernels import fp8_gemm
    from miles_core.kernels.swiglu import swiglu

    x, src, counts = _inputs(tokens)
    y = torch.randn(tokens * TOP_K, 2 * INTER, device="cuda", dtype=torch.bfloat16)  # a gate_up output
    quant = [
        ("index_select + act-quant", lambda: fp8_gemm.fp8_act_quant_triton(x.index_select(0, src))[0]),
        ("act-quant of x[src]", lambda: fp8_gemm.fp8_act_quant_triton(x, src=src)[0]),
    ]
    _time("fp8 act-quant: gather", tokens, quant)
    act = [
        ("swiglu + act-quant", lambda: fp8_gemm.fp8_act_quant_triton(swiglu(y))[0]),
        ("SwiGLU + act-quant kernel", lambda: fp8_gemm.swiglu_fp8_quant_triton(y)[0]),
    ]
    _time("fp8 down input: SwiGLU", tokens, act)

    def unfused():
        h = swiglu(fp8_gemm.grouped_fp8_linear(x.index_select(0, src), w1, s1, counts))  # [M, I]
        return fp8_gemm.grouped_fp8_linear(h, w2, s2, counts)

    def epilogue(on: bool, xq=None):
        old, fp8_gemm.SWIGLU_EPILOGUE = fp8_gemm.SWIGLU_EPILOGUE, on
        try:
            return fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src, xq)
        finally:
            fp8_gemm.SWIGLU_EPILOGUE = old

    xq = fp8_gemm.fp8_act_quant(x)  # what the norm before the MoE hands over in the engine
    whole = [
        ("index_select, act-quant, gate_up, swiglu, act-quant, down", unfused),
        ("act-quant(gather), gate_up, swiglu+act-quant, down", lambda: epilogue(False)),
        ("act-quant(gather), gate_up with swiglu+act-quant epilogue, down", lambda: epilogue(True)),
        ("(rows quantized by the norm) gate_up gathering them, with the epilogue, down",
         lambda: epilogue(True, xq)),
    ]  # fmt: skip
    _time("fp8 experts", tokens, whole)


def int4(tokens: int, p, s) -> None:
    from miles_core.kernels.w4a16_gemm import grouped_w4a16_linear

    x, src, counts = _inputs(tokens)
    gather = [
        ("index_select + W4A16", lambda: grouped_w4a16_linear(x.index_select(0, src), p, s, counts, 128)),
        ("W4A16 gathering its rows", lambda: grouped_w4a16_linear(x, p, s, counts, 128, src=src)),
    ]
    _time("int4 gate_up: gather", tokens, gather)


def experts(batches, sweep: bool) -> None:
    from bench.common import QWEN3_30B_A3B
    from miles_core.kernels import w4a16_gemm
    from miles_core.model.config import ModelConfig
    from miles_core.model.moe import Experts
    from miles_core.quant import fp8_block_quantize, int4_group_quantize, pack_int4

    layer = Experts(ModelConfig.from_hf(dict(QWEN3_30B_A3B, num_hidden_layers=1))).cuda().bfloat16()
    torch.nn.init.normal_(layer.gate_up_proj, std=0.02)
    torch.nn.init.normal_(layer.down_proj, std=0.02)
    (w1, s1), (w2, s2) = (fp8_block_quantize(w) for w in (layer.gate_up_proj, layer.down_proj))
    q, s = int4_group_quantize(layer.gate_up_proj.float(), 128)
    p, s = pack_int4(q), w4a16_gemm.group_major(s)
    print("\n| experts launch fusion | tokens | variant | us | vs first row | bitwise |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for tokens in batches:
            bf16(tokens, layer, sweep)
            fp8(tokens, w1, s1, w2, s2)
            int4(tokens, p, s)
