"""(Experiment, removed after its run; the kernel it times is at commit eeea5b2.) Device experiment (session 7): the FP8 expert MLP in one persistent launch vs the three launches."""
import sys

import torch

sys.path.insert(0, ".")
from bench.quant import bench_graph  # noqa: E402
from miles_core.kernels import fp8_gemm, moe_route  # noqa: E402
from miles_core.quant import fp8_block_quantize  # noqa: E402


def plan(tokens, g, e=128, k=8):
    scores = torch.rand(tokens, e, generator=g)
    experts = scores.topk(k, dim=-1)[1].cuda()
    order = torch.argsort(experts.flatten(), stable=True)
    src = (order // k).to(torch.int64)
    counts = torch.bincount(experts.flatten(), minlength=e)
    return src, counts


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    g = torch.Generator().manual_seed(0)
    layers = 8
    ws = []
    for _ in range(layers):
        w1, s1 = fp8_block_quantize(torch.randn(128, 1536, 2048, device="cuda") * 0.05)
        w2, s2 = fp8_block_quantize(torch.randn(128, 2048, 768, device="cuda") * 0.05)
        ws.append((w1, s1, w2, s2))
    rows = []
    for tokens in (64, 256):
        src, counts = plan(tokens, g)
        x = (torch.randn(tokens, 2048, generator=g) * 3).bfloat16().cuda()
        xq = fp8_gemm.fp8_act_quant(x)
        m = src.numel()
        cfg = fp8_gemm.grouped_fp8_config(m, 128)
        fp8_gemm.STREAM_EXPERTS = False
        ref = fp8_gemm.grouped_fp8_experts(x, counts, *ws[0], src, xq=xq)
        base = bench_graph([lambda w=w: fp8_gemm.grouped_fp8_experts(x, counts, *w, src, xq=xq) for w in ws], 10)
        rows.append((tokens, "three launches (now)", base, "", ""))
        print(rows[-1], flush=True)
        from dataclasses import replace
        for st in (3, 4):
            c = replace(cfg, num_stages=st)
            y = fp8_gemm.grouped_fp8_experts_stream(*xq, counts, *ws[0], x.dtype, c, src=src, persist=False)
            same = torch.equal(y, ref)
            t = bench_graph([lambda w=w: fp8_gemm.grouped_fp8_experts_stream(*xq, counts, *w, x.dtype, c, src=src, persist=False) for w in ws], 10)
            rows.append((tokens, f"one launch, a program per tile (ticket order), stages {st}", t, base / t, same))
            print(rows[-1], flush=True)
        continue
        for st in (3, 4):
            c = replace(cfg, num_stages=st)
            y = fp8_gemm.grouped_fp8_experts_stream(*xq, counts, *ws[0], x.dtype, c, src=src)  # first call: 1/SM
            key = next(k for k in fp8_gemm._RESIDENT if k[1] == c)
            res = fp8_gemm._RESIDENT[key]
            for nprog in sorted({132, 264, 396, 528, res}):
                if nprog > res:
                    continue
                y = fp8_gemm.grouped_fp8_experts_stream(*xq, counts, *ws[0], x.dtype, c, src=src, nprog=nprog)
                same = torch.equal(y, ref)
                t = bench_graph([lambda w=w: fp8_gemm.grouped_fp8_experts_stream(*xq, counts, *w, x.dtype, c, src=src, nprog=nprog) for w in ws], 10)
                rows.append((tokens, f"one persistent launch, stages {st}, {nprog} programs (resident {res})", t, base / t, same))
                print(rows[-1], flush=True)
    print("\n| tokens | variant | us per layer | vs now | bitwise |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3] if r[3] == '' else f'{r[3]:.3f}x'} | {r[4]} |")


if __name__ == "__main__":
    main()
