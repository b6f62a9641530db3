"""Training throughput (GRPO step) and weight-sync cost: miles vs transformers on a Qwen3-MoE shape.

    PYTHONPATH=. python bench/train.py --layers 4 --batch 4 --seq 2048        # on the GPU
    PYTHONPATH=. python bench/train.py --small                                # CPU smoke run of the script

Training: one GRPO optimizer step (forward, PPO-clip loss on float32 log-probs of a 151,936-token
vocabulary, backward, grad clipping, fused AdamW) on bf16 weights, the same loss for both:
  - miles: `miles_core.train.grpo_step` on micro-batches built by the trainer (grouped-GEMM experts);
  - transformers: its Qwen3-MoE with `set_experts_implementation("grouped_mm")`, the same loss
    written with miles_core.rl, the same fused AdamW.
Both models share the same weight storage (miles' parameters are HF's tensors) and run one after the
other. MFU = 3 x forward matmul FLOPs (forward + backward) per second, against the H100 dense bf16
peak (989 TFLOP/s, as in BASELINES.md) and against the bf16 GEMM ceiling measured in the same run.

Weight sync, per GB of trainer weights: `sync_weights` into (a) a separate bf16 copy of the model
(one copy_ per tensor), (b) an FP8 engine model (re-quantization on the fly), (c) the very same
module (shared: nothing moves); the floor is one device-to-device copy of the same bytes, measured.
`--small` checks the code paths on the CPU. `--micro-batches N` accumulates N micro-batches per
optimizer step (both implementations), as a GRPO step over a larger batch does.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench.common import QWEN3_30B_A3B, build_pair, moe_forward_flops

H100_BF16_PEAK = 989.0  # TFLOP/s, dense


def timed(fn, device: torch.device, warmup: int = 2, reps: int = 5) -> float:
    """Median seconds of fn(), synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def shape(args) -> dict:
    if not args.small:
        return dict(QWEN3_30B_A3B, num_hidden_layers=args.layers)
    small = dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, vocab_size=1024)  # fmt: skip
    return dict(QWEN3_30B_A3B, num_hidden_layers=args.layers, **small)


def synthetic_samples(batch: int, seq: int, vocab: int, prompt: int = 64):
    from miles_core.train import samples_from_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    rewards = torch.rand(batch, generator=g)
    samples = samples_from_tokens(ids[:, :prompt].tolist(), ids[:, prompt:].tolist(), rewards.tolist(),
                                  logprobs=(-torch.rand(batch, seq + 1 - prompt, generator=g)).tolist())  # fmt: skip
    for i, s in enumerate(samples):
        s.group = str(i // 2)
    return samples


def bench_miles(miles, samples, device, reps: int, mb_tokens: int, profile: bool = False) -> float:
    from miles_core.train import TrainConfig, Trainer, assign_advantages, grpo_step

    cfg = TrainConfig(lr=1e-6, micro_batch_tokens=mb_tokens, r3=False, eps_clip_high=0.28)
    trainer = Trainer(miles, cfg)
    kept, _ = assign_advantages(samples, cfg)
    mbs = trainer.micro_batches(kept)
    step = lambda: grpo_step(miles, trainer.optimizer, trainer.scheduler, mbs, cfg)  # noqa: E731
    seconds = timed(step, device, reps=reps)
    if profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    return seconds


def bench_transformers(hf, samples, device, reps: int, mb_tokens: int) -> float:
    from miles_core.rl import aggregate_loss, grpo_advantages, ppo_clip_loss, token_logprobs
    from miles_core.train import make_micro_batches

    if device.type == "cuda":
        hf.set_experts_implementation("grouped_mm")
    mbs = [mb.to(device) for mb in make_micro_batches(samples, mb_tokens)]
    advs = [grpo_advantages(mb.rewards, torch.arange(mb.rewards.shape[0], device=device) // 2) for mb in mbs]
    denom = float(sum(int(mb.loss_mask.sum()) for mb in mbs))  # token-mean over the whole mini-batch
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.98), fused=device.type == "cuda" or None)
    hf.train()

    def step():
        for mb, adv in zip(mbs, advs, strict=True):
            logits = hf(mb.input_ids).logits  # [B, T, V]
            logp = token_logprobs(logits, mb.targets)
            pl = ppo_clip_loss(logp, logp.detach(), adv, mb.loss_mask, eps_low=0.2, eps_high=0.28)
            aggregate_loss(pl.loss, mb.loss_mask, denom=denom).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, device, reps=reps)


def _copy_floor(nbytes: int, device, reps: int) -> float:
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(flat)
    return timed(lambda: dst.copy_(flat), device, reps=reps)


def _sync_seconds(miles, engine, device, reps: int) -> float:
    from miles_core.train import sync_weights

    return timed(lambda: sync_weights(miles, engine, 1), device, reps=reps)


def _fp8_engine(miles):
    from miles_core.quant import quantize_model_

    engine = copy.deepcopy(miles)
    quantize_model_(engine, "fp8")
    return engine


def bench_sync(miles, device, reps: int) -> list[tuple[str, float, int]]:
    """(what, seconds, source bytes) for the copy floor, bf16 copy, FP8 re-quantization and shared."""
    nbytes = sum(p.numel() * p.element_size() for p in miles.parameters())
    rows = [("device copy floor (one flat copy_)", _copy_floor(nbytes, device, reps), nbytes)]
    rows.append(("bf16 copy into engine", _sync_seconds(miles, copy.deepcopy(miles), device, reps), nbytes))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows.append(("fp8 re-quantize into engine", _sync_seconds(miles, _fp8_engine(miles), device, reps), nbytes))
    rows.append(("shared module (no copy)", _sync_seconds(miles, miles, device, reps), nbytes))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="micro-batches of batch x seq tokens per optimizer step (gradient accumulation)",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny shape on the CPU (fp32): checks the script only")
    ap.add_argument("--skip-sync", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time miles with torch.compile'd layers")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one miles step")
    args = ap.parse_args()
    if args.small:
        args.layers, args.batch, args.seq, args.reps = 2, 2, 128, 2
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ceiling = None
    if device.type == "cuda":
        from bench.common import gemm_ceiling_tflops

        ceiling = gemm_ceiling_tflops()
    raw = shape(args)
    hf, miles = build_pair(raw, device, dtype)
    n_mb = args.micro_batches
    samples = synthetic_samples(args.batch * n_mb, args.seq, raw["vocab_size"])
    mb_tokens = args.batch * args.seq
    tokens = mb_tokens * n_mb
    flops = 3 * moe_forward_flops(raw, args.layers, args.batch * n_mb, args.seq)
    rows = [("miles grpo_step", bench_miles(miles, samples, device, args.reps, mb_tokens, args.profile))]
    if args.compile:
        miles.compile_layers()
        rows.append(("miles grpo_step + compile_layers", bench_miles(miles, samples, device, args.reps, mb_tokens)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    label = "transformers grouped_mm" if device.type == "cuda" else "transformers (default experts)"
    rows.append((label, bench_transformers(hf, samples, device, args.reps, mb_tokens)))

    print(f"\nGRPO train step, Qwen3-MoE shape, {args.layers} layers, {n_mb} micro-batch(es) of "
          f"{args.batch} x {args.seq} = {tokens} tokens per optimizer step")  # fmt: skip
    n_params = sum(p.numel() for p in miles.parameters())
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {n_params / 1e9:.2f} B params, {flops / 1e12:.1f} TFLOP per step")  # fmt: skip
    if ceiling:
        print(f"bf16 GEMM ceiling (8192^3, this run): {ceiling:.0f} TFLOP/s")
    print("| implementation | s/step | tokens/s | TFLOP/s | MFU (989 peak) | of measured ceiling |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        tf = flops / s / 1e12
        of_ceiling = f"{100 * tf / ceiling:.1f}%" if ceiling else "-"
        print(f"| {name} | {s:.3f} | {tokens / s:,.0f} | {tf:.1f} | {100 * tf / H100_BF16_PEAK:.1f}% | {of_ceiling} |")
    base = next(t for name, t in rows if name.startswith("transformers"))
    for name, t in rows:
        if name.startswith("miles"):
            print(f"{name} speed-up vs transformers: {base / t:.2f}x")

    if not args.skip_sync:
        sync = bench_sync(miles, device, args.reps)
        floor = sync[0][1]
        print("\nGB = trainer weights; floor = one device copy_ of as many bytes")
        print("| weight sync | ms | GB | ms/GB | GB/s | x floor |")
        print("|---|---|---|---|---|---|")
        for name, s, nb in sync:
            gb = nb / 1e9
            if name.startswith("shared"):  # nothing moves: only the call's own cost
                print(f"| {name} | {1e3 * s:.3f} | 0 | - | - | - |")
                continue
            print(f"| {name} | {1e3 * s:.2f} | {gb:.2f} | {1e3 * s / gb:.2f} | {gb / s:.1f} | {s / floor:.2f} |")


if __name__ == "__main__":
    main()
