"""Forward (prefill) throughput: miles vs transformers on a Qwen3-30B-A3B-shaped MoE cut to N layers.

    PYTHONPATH=. python bench/forward.py --layers 8 --batch 64 --seq 512

Both models share the same bf16 weights on one GPU (miles' parameters are assigned HF's tensors).
Prints tokens/s, ms per forward and MFU against the bf16 GEMM ceiling measured in the same run.
transformers runs with its `grouped_mm` experts path (its fastest) and its default eager loop.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import QWEN3_30B_A3B, bench_ms, build_pair, gemm_ceiling_tflops, moe_forward_flops


def build(layers: int):
    raw = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    hf, miles = build_pair(raw, "cuda", torch.bfloat16)
    return hf.eval(), miles.eval(), raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-eager", action="store_true", help="skip transformers' slow eager experts loop")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one miles forward")
    ap.add_argument("--compile", action="store_true", help="also time miles with torch.compile'd layers")
    args = ap.parse_args()

    ceiling = gemm_ceiling_tflops()
    hf, miles, raw = build(args.layers)
    ids = torch.randint(0, raw["vocab_size"], (args.batch, args.seq), device="cuda")
    flops = moe_forward_flops(raw, args.layers, args.batch, args.seq)
    tokens = args.batch * args.seq
    rows = []

    def run(name, fn, reps=args.reps):
        with torch.inference_mode():
            ms = bench_ms(fn, warmup=2, reps=reps)
        tflops = flops / (ms * 1e-3) / 1e12
        rows.append((name, ms, tokens / (ms * 1e-3), tflops, 100 * tflops / ceiling))
        torch.cuda.empty_cache()

    run("miles", lambda: miles(ids).logits)
    if args.compile:
        miles.compile_layers()
        t0 = time.time()
        with torch.inference_mode():
            miles(ids)
        torch.cuda.synchronize()
        print(f"compile: {time.time() - t0:.1f} s")
        run("miles + torch.compile layers", lambda: miles(ids).logits)
    hf.set_experts_implementation("grouped_mm")
    run("transformers grouped_mm", lambda: hf(ids).logits)
    if not args.skip_eager:
        hf.set_experts_implementation("eager")
        run("transformers eager", lambda: hf(ids).logits, reps=3)

    print(f"\nforward, Qwen3-30B-A3B shape, {args.layers} layers, batch {args.batch} x {args.seq} = {tokens} tokens")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"bf16 GEMM ceiling (8192^3, this run): {ceiling:.0f} TFLOP/s; model FLOPs/forward {flops / 1e12:.1f} T")
    print(f"| {'implementation':<26} | {'ms':>8} | {'tokens/s':>10} | {'TFLOP/s':>8} | {'MFU':>6} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 8}|")
    for name, ms, tps, tf, mfu in rows:
        print(f"| {name:<26} | {ms:8.1f} | {tps:10,.0f} | {tf:8.0f} | {mfu:5.1f}% |")
    base = next(r[1] for r in rows if r[0] == "transformers grouped_mm")
    for r in rows:
        if r[0].startswith("miles"):
            print(f"{r[0]} speed-up vs transformers grouped_mm: {base / r[1]:.2f}x")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            miles(ids)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


if __name__ == "__main__":
    main()
