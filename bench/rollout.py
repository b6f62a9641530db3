"""Rollout throughput: the miles engine vs transformers `generate`, and the memory floor.

    PYTHONPATH=. python bench/rollout.py --layers 8 --batch 64 256 --prompt 512 --new 512 --profile

Model: Qwen3-30B-A3B shape cut to `--layers` layers, random bf16 weights shared by every engine
(miles' parameters are assigned transformers' tensors; the FP8 model quantizes a copy). Each
batch: B random prompts of `--prompt` tokens, `--new` greedy tokens each, EOS ignored.

- miles: `Engine.generate` end to end (prefill + decode), with CUDA graphs (bf16 and FP8,
  `quantize_model_(model, "fp8")`) and without (bf16, dynamic eager decode, first batch only).
  Before the timing, `Engine.warmup()` captures the decode graphs of every length bucket (as a
  serving engine does at start-up; an RL engine keeps them across rounds) and a short request
  takes the kernels' first-call costs. `--unfused` adds the same runs with the decode-size fused
  kernels off (`miles_core.kernels.DECODE_FUSION`), to show what they save.
  Decode ms/step is the median of the steps that only decode (every sample running, no prefill
  in the step), measured between the ends of consecutive steps (each ends with a host sync).
- transformers: `generate(do_sample=False)` with `set_experts_implementation("grouped_mm")` (its
  fastest experts path; `--hf-new` tokens) and with its default eager loop (`--eager-new`), in the
  same run on the same weights; ms/step = (time of N tokens - time of 1 token) / (N - 1), so the
  prefill is left out.
- floor: bytes one decode step must read (every attention / router / norm weight, the LM head,
  the experts at least one token of the batch routes to - expected count under uniform routing,
  E * (1 - (1 - k/E)^B) per layer - and the KV cache at the mean context length prompt + new/2)
  divided by the device bandwidth measured now (a 4 GiB device-to-device copy: 2 bytes moved per
  byte copied). Goal: miles' decode step <= 1.7x the floor at batch 64.
- `--profile-prefill`: where the first batch's prefill goes (one step per `max_prefill_tokens` chunk
  of prompts, plus its first token), per engine: warm wall time and the top CUDA kernels.
- `--profile`: where a decode-only step's time goes at the first batch and context prompt + new/2
  (`profile_decode`): step wall time, the CUDA-graph replay alone, and the top CUDA kernels; the
  same for the dynamic eager decode (aten ops by CPU and CUDA time) and for FP8.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch


def measured_bandwidth(gib: int = 4) -> float:
    """Device memory bandwidth in bytes/s: a large copy reads and writes every byte once."""
    n = gib * 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / min(times)


def decode_floor_bytes(cfg: dict, layers: int, batch: int, ctx: float, expert_bytes: float = 2.0) -> float:
    """Bytes a decode step of `batch` tokens at mean context `ctx` must read (see module doc)."""
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    e, k, i = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    attn = h * (nq * hd) * 2 + h * (nkv * hd) * 2 + 2 * hd + 2 * h  # q, o, k, v, q/k norms, layer norms
    router = e * h
    touched = e * (1 - (1 - k / e) ** batch)
    experts = touched * 3 * h * i * expert_bytes
    kv = batch * ctx * 2 * nkv * hd * 2  # K and V, bf16
    per_layer = (attn + router) * 2 + experts + kv
    head = cfg["vocab_size"] * h * 2 + batch * h * 2  # LM head + the embedding rows gathered
    return layers * per_layer + head


def run_miles(model, batch: int, prompt: int, new: int, graphs: bool, vocab: int) -> dict:
    from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams

    config = EngineConfig(
        max_slots=batch,
        max_len=prompt + new + 1,
        max_prefill_tokens=min(batch * prompt, 32768),
        cuda_graphs=graphs,
        graph_len_bucket=128,
    )
    engine = Engine(model, None, config)
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
    reqs = [Request(f"p{j}", torch.randint(0, vocab, (prompt,), generator=g).tolist(), sp) for j in range(batch)]
    short = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    warm = [Request(f"w{j}", r.prompt_tokens, short) for j, r in enumerate(reqs)]  # the batch's prefill shapes too
    # Start-up costs out of the timing, as a serving engine pays them once: every decode graph
    # (one per attended-length bucket) and the kernels' first calls (compiles, autotuning, handles).
    engine.warmup()
    engine.generate(warm)
    steps: list[tuple[float, int]] = []
    last = [time.perf_counter()]

    def on_step(n_tokens, finished):
        now = time.perf_counter()  # each step ends with a host sync (sampled tokens), so this is device time
        steps.append((now - last[0], n_tokens))
        last[0] = now

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    last[0] = t0
    out = engine.generate(reqs, on_step=on_step)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    decode = [dt for dt, n in steps if n == batch]
    produced = sum(len(s.response_tokens) for s in out)
    del engine
    torch.cuda.empty_cache()
    return {
        "s": total,
        "tok/s": produced / total,
        "ms/step": 1e3 * statistics.median(decode) if decode else float("nan"),
        "prefill ms": 1e3 * steps[0][0] if steps else float("nan"),  # the first step: prefill + 1 token
    }


def profile_decode(model, batch: int, prompt: int, vocab: int, mode: str, steps: int = 6, top: int = 25) -> None:
    """Print where a decode-only step's time goes (mode: graphs | static | dynamic): step wall time,
    the graph replay alone (GPU) and the rest (sampling + host work outside the replay), and the top
    CUDA kernels of `steps` steps (eager modes: aten ops, by CUDA time and by CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams

    config = EngineConfig(
        max_slots=batch,
        max_len=prompt + 64,
        max_prefill_tokens=min(batch * prompt, 32768),
        cuda_graphs=mode == "graphs",
        static_decode=mode != "dynamic",
        graph_len_bucket=128,
    )
    engine = Engine(model, None, config)
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True)
    reqs = [Request(f"p{j}", torch.randint(0, vocab, (prompt,), generator=g).tolist(), sp) for j in range(batch)]
    engine.scheduler.enqueue(engine.samples_for(reqs))
    with torch.inference_mode():
        while engine.scheduler.waiting:
            engine.step()  # prefill (+ first decode)
        for _ in range(4):
            engine.step()  # captures the bucket's graph
        walls = []
        for _ in range(10):
            t0 = time.perf_counter()
            engine.step()  # ends with the host copy of the sampled tokens: a full step
            walls.append(time.perf_counter() - t0)
        wall = 1e3 * statistics.median(walls)
        line = f"decode step wall {wall:.2f} ms"
        if mode == "graphs":
            graph = next(iter(engine._graphs._graphs.values()))[0]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph.replay()  # rewrites the same cache entries: harmless
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            replay = start.elapsed_time(end) / 10
            line += f"; graph replay alone {replay:.2f} ms (GPU); outside the replay {wall - replay:.2f} ms"
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()  # each step ends with a host sync
    print(f"\nprofile, batch {batch}, context ~{prompt}, {mode}: {line}")
    events = prof.key_averages()
    kernels = [e for e in events if str(e.device_type).endswith("CUDA")]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    print(f"kernel time per step {busy:.2f} ms (sum of self CUDA time / {steps} steps)")
    print(events.table(sort_by="self_cuda_time_total" if mode == "graphs" else "cuda_time_total", row_limit=top))
    if mode != "graphs":
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    try:
        from miles_core.rollout.flash_decode import launch_config

        print(f"flash_decode launch: {launch_config()}")
    except ImportError:  # an engine without the kernel
        pass
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_prefill(model, batch: int, prompt: int, vocab: int, name: str, top: int = 25) -> None:
    """Print where one prefill step of the whole batch goes (the step `run_miles` times first, its
    chunk `max_prefill_tokens` as there): wall time of a repeat after a warm-up, and the top CUDA kernels."""
    from torch.profiler import ProfilerActivity, profile

    from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams

    config = EngineConfig(max_slots=batch, max_len=prompt + 8, max_prefill_tokens=min(batch * prompt, 32768))
    engine = Engine(model, None, config)
    g = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    reqs = [Request(f"p{j}", torch.randint(0, vocab, (prompt,), generator=g).tolist(), sp) for j in range(batch)]
    walls = []
    for _ in range(2):  # the first pays first-call costs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(reqs)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(reqs)
    print(f"\nprefill profile, {name}, batch {batch} x {prompt} tokens: wall {1e3 * walls[1]:.1f} ms (warm)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top))
    del engine
    torch.cuda.empty_cache()


def run_hf(hf, batch: int, prompt: int, new: int, impl: str, vocab: int) -> dict:
    """transformers generate: ms/step = (time of `new` tokens - time of 1 token) / (new - 1)."""
    from transformers import GenerationConfig

    hf.set_experts_implementation(impl)
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def timed(n: int) -> float:
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, generation_config=gc)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        hf.generate(ids[:, :16], generation_config=GenerationConfig(do_sample=False, max_new_tokens=2, pad_token_id=0))
        first = timed(1)  # prefill + one token
        total = timed(new)
    torch.cuda.empty_cache()
    return {"s": total, "tok/s": batch * new / total, "ms/step": 1e3 * (total - first) / (new - 1)}


def main() -> None:
    from bench.forward import build
    from miles_core import kernels

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--hf-new", type=int, default=128, help="new tokens for transformers grouped_mm")
    ap.add_argument("--eager-new", type=int, default=32, help="new tokens for transformers' slow eager loop")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-eager", action="store_true", help="skip transformers' eager loop and miles' no-graph run")
    ap.add_argument("--skip-fp8", action="store_true")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph miles run")
    ap.add_argument("--profile", action="store_true", help="first profile decode steps at the first --batch")
    ap.add_argument("--profile-only", action="store_true", help="--profile, then stop")
    ap.add_argument("--eager-profile", choices=["static", "dynamic"], default="dynamic", help="eager mode profiled")
    ap.add_argument("--profile-prefill", action="store_true", help="first profile the first batch's prefill")
    ap.add_argument("--unfused", action="store_true", help="also run without the decode-size fused kernels")
    ap.add_argument("--fp8-experts", action="store_true", help="also FP8 experts with bf16 attention")
    ap.add_argument("--fp8-experts-only", action="store_true", help="--profile: only the FP8-experts engine")
    args = ap.parse_args()

    bandwidth = measured_bandwidth()
    hf, miles, raw = build(args.layers)
    vocab = raw["vocab_size"]
    fp8 = fp8e = None
    if not args.skip_fp8:
        from miles_core.model import build_model
        from miles_core.model.config import ModelConfig
        from miles_core.quant import quantize_model_

        if not args.fp8_experts_only:
            fp8 = build_model(ModelConfig.from_hf(raw), device="cuda", dtype=torch.bfloat16).eval()
            fp8.load_state_dict(miles.state_dict())
            quantize_model_(fp8, "fp8")  # every linear layer but the LM head and routers, as DeepSeek-V3's FP8
        # FP8 routed experts, bf16 attention (faster at decode: bench/RESULTS.md)
        if args.fp8_experts or args.fp8_experts_only:
            fp8e = build_model(ModelConfig.from_hf(raw), device="cuda", dtype=torch.bfloat16).eval()
            fp8e.load_state_dict(miles.state_dict())
            quantize_model_(fp8e, "fp8", scope="experts")
        torch.cuda.empty_cache()

    ctx = args.prompt + args.new // 2
    if args.profile_prefill:
        for name, m in (("bf16", miles), ("fp8", fp8), ("fp8 experts", fp8e)):
            if m is not None:
                profile_prefill(m, args.batch[0], args.prompt, vocab, name)
    if args.profile or args.profile_only:
        if not args.fp8_experts_only:
            profile_decode(miles, args.batch[0], ctx, vocab, "graphs")
        if not args.skip_eager:
            profile_decode(miles, args.batch[0], ctx, vocab, args.eager_profile, top=30)
        if fp8 is not None:
            profile_decode(fp8, args.batch[0], ctx, vocab, "graphs")
        if fp8e is not None:
            profile_decode(fp8e, args.batch[0], ctx, vocab, "graphs")
        if args.profile_only:
            return

    rows = []
    for b in args.batch:
        floor_ms = 1e3 * decode_floor_bytes(raw, args.layers, b, ctx) / bandwidth
        floor_fp8 = 1e3 * decode_floor_bytes(raw, args.layers, b, ctx, expert_bytes=1.0) / bandwidth
        gb = decode_floor_bytes(raw, args.layers, b, ctx) / 1e9
        rows.append((b, f"floor bf16 ({gb:.1f} GB/step)", {"ms/step": floor_ms, "tok/s": b / floor_ms * 1e3}))
        if fp8 is not None:
            rows.append((b, "floor fp8 experts", {"ms/step": floor_fp8, "tok/s": b / floor_fp8 * 1e3}))
        first = b == args.batch[0]
        runs = [("miles bf16", miles, False, True)] if (first and not args.skip_eager) or args.no_graphs else []
        if not args.no_graphs:
            runs.append(("miles bf16 + CUDA graphs", miles, True, True))
        if fp8 is not None:
            runs.append(("miles fp8 + CUDA graphs", fp8, not args.no_graphs, True))
        if fp8e is not None:
            runs.append(("miles fp8 experts + CUDA graphs", fp8e, not args.no_graphs, True))
        if args.unfused:  # the same without the decode-size fused kernels (kernels.DECODE_FUSION)
            runs += [(f"{name} (unfused)", m, g, False) for name, m, g, _ in runs if g]
        for name, model, graphs, fused in runs:
            kernels.DECODE_FUSION = fused
            rows.append((b, name, run_miles(model, b, args.prompt, args.new, graphs, vocab)))
            kernels.DECODE_FUSION = True
            print(rows[-1], flush=True)  # partial results survive a timeout
        if not args.skip_hf:
            r = run_hf(hf, b, args.prompt, args.hf_new, "grouped_mm", vocab)
            rows.append((b, f"transformers grouped_mm ({args.hf_new} new)", r))
            print(rows[-1], flush=True)
            if not args.skip_eager:
                r = run_hf(hf, b, args.prompt, args.eager_new, "eager", vocab)
                rows.append((b, f"transformers eager ({args.eager_new} new)", r))
    print_table(rows, args, bandwidth)


def print_table(rows: list, args, bandwidth: float) -> None:
    print(f"\nrollout, Qwen3-30B-A3B shape, {args.layers} layers, prompt {args.prompt} + {args.new} new tokens, greedy")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"measured bandwidth (4 GiB copy): {bandwidth / 1e12:.2f} TB/s")
    print("tokens/s: end to end (prefill included); decode tok/s: batch / decode ms per step")
    print("| batch | engine | ms/step | tokens/s | decode tok/s | x floor | vs transformers | first step ms |")
    print("|---|---|---|---|---|---|---|---|")
    floors = {b: r["ms/step"] for b, name, r in rows if name.startswith("floor bf16")}
    hf = {b: r["ms/step"] for b, name, r in rows if name.startswith("transformers grouped_mm")}
    for b, name, r in rows:
        ratio = r["ms/step"] / floors[b]
        vs = f"{hf[b] / r['ms/step']:.2f}x" if b in hf and not name.startswith("floor") else "-"
        decode = b / r["ms/step"] * 1e3
        first = f"{r['prefill ms']:.1f}" if "prefill ms" in r else "-"
        cells = [b, name, f"{r['ms/step']:.2f}", f"{r['tok/s']:,.0f}", f"{decode:,.0f}", f"{ratio:.2f}", vs, first]
        print("| " + " | ".join(map(str, cells)) + " |")
    for b in floors:
        got = {name: r for bb, name, r in rows if bb == b}
        for tag, kind in itertools.product(("", " (unfused)"), ("fp8", "fp8 experts")):
            bf16, fp8 = got.get(f"miles bf16 + CUDA graphs{tag}"), got.get(f"miles {kind} + CUDA graphs{tag}")
            if bf16 and fp8:
                print(
                    f"batch {b}{tag}: {kind} / bf16 (graphs) tokens/s {fp8['tok/s'] / bf16['tok/s']:.2f}x, "
                    f"decode step {bf16['ms/step'] / fp8['ms/step']:.2f}x"
                )


if __name__ == "__main__":
    main()
