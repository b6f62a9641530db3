# ruff: noqa  (a throwaway measurement script, reverted in the next commit)
"""Experiment (reverted after measuring): the one-launch FP8 expert MLP vs the three-launch chain, 8 layers in CUDA
graphs. `PYTHONPATH=. python bench/exp_fused_experts.py` on the device."""

import torch

from bench.decode_kernels import bandwidth, graph_us
from miles_core.kernels import fp8_gemm as F
from miles_core.quant import fp8_block_quantize

torch.manual_seed(0)
L, E, H, I = 8, 128, 2048, 768
bw = bandwidth()
layers = []
for _ in range(L):
    w1, s1 = fp8_block_quantize(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02)
    w2, s2 = fp8_block_quantize(torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02)
    layers.append((w1, s1, w2, s2))
print("| tokens | variant | us/layer | x copy bw | vs chain | bitwise |")
print("|---|---|---|---|---|---|")
best, base_64 = {}, None
for T in (64, 256):
    g = torch.Generator().manual_seed(T)
    experts = torch.stack([torch.randperm(E, generator=g)[:8] for _ in range(T)]).flatten()
    src = (torch.argsort(experts, stable=True) // 8).to(torch.int32).cuda()
    counts = torch.bincount(experts, minlength=E).cuda()
    nb = int((counts > 0).sum()) * 3 * I * H
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    xq = F.fp8_act_quant_triton(x)
    variants = [("chain (3 launches)", None)]
    variants += [
        (
            f"fused bn2 {bn2}, {w} warps, {st} stages",
            dict(bt=16 if T <= 128 else 32, bn2=bn2, num_warps=w, num_stages=st),
        )
        for bn2, w, st in ((128, 8, 3), (128, 8, 4), (128, 8, 5))
    ]
    ref, base = None, None
    base_64 = base_64 if T != 64 else None
    for label, cfg in variants:

        def run(cfg=cfg):
            outs = []
            for w1, s1, w2, s2 in layers:
                if cfg is None:
                    outs.append(F.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src=src, xq=xq))
                else:
                    outs.append(
                        F.fp8_experts_fused_triton(xq[0], xq[1], counts, w1, s1, w2, s2, torch.bfloat16, src=src, **cfg)
                    )
            return outs

        try:
            with torch.inference_mode():
                out = run()
                same = "-" if ref is None else all(torch.equal(a, b) for a, b in zip(out, ref))
                ref = out if ref is None else ref
                us = graph_us(run, calls=3) / L
        except Exception as exc:
            print(f"| {T} | {label} | failed {type(exc).__name__}: {str(exc)[:80]} | | | |", flush=True)
            continue
        base = base or us
        if T == 64 and cfg is None:
            base_64 = us
        if cfg is not None and us < best.get(T, (1e9,))[0]:
            best[T] = (us, cfg)
        print(f"| {T} | {label} | {us:.1f} | {nb / (us * 1e-6) / bw:.3f} | {base / us:.3f}x | {same} |", flush=True)

print("best", best, flush=True)
del layers
torch.cuda.empty_cache()
import runpy
import sys

if best.get(64, (1e9,))[0] < base_64:
    F.FUSED_EXPERTS_MAX_M, F.FUSED_EXPERTS_CONFIG = 1024, best[64][1]
    sys.argv = ["bench/rollout.py", "--batch", "64", "--fp8-experts", "--skip-hf", "--skip-eager"]
    runpy.run_path("bench/rollout.py", run_name="__main__")
