"""(Experiment, removed after its run; the grid it times is at commit 2fcdaab.) Device experiment (session 7): grouped FP8 decode programs per (expert, N tile), weights loaded first."""
import sys

import torch

sys.path.insert(0, ".")
from bench.quant import bench_graph  # noqa: E402
from miles_core.kernels import fp8_gemm  # noqa: E402
from miles_core.quant import fp8_block_quantize  # noqa: E402


def plan(tokens, g, e=128, k=8):
    experts = torch.rand(tokens, e, generator=g).topk(k, dim=-1)[1].cuda()
    order = torch.argsort(experts.flatten(), stable=True)
    return (order // k).to(torch.int64), torch.bincount(experts.flatten(), minlength=e)


def main():
    g = torch.Generator().manual_seed(0)
    ws = []
    for _ in range(8):
        w1, s1 = fp8_block_quantize(torch.randn(128, 1536, 2048, device="cuda") * 0.05)
        w2, s2 = fp8_block_quantize(torch.randn(128, 2048, 768, device="cuda") * 0.05)
        ws.append((w1, s1, w2, s2))
    rows = []
    for tokens in (64, 256):
        src, counts = plan(tokens, g)
        x = (torch.randn(tokens, 2048, generator=g) * 3).bfloat16().cuda()
        xq = fp8_gemm.fp8_act_quant(x)
        cfg = fp8_gemm.grouped_fp8_config(src.numel(), 128)
        tiles = dict(bm=cfg.bm, bn=cfg.bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages, swap=cfg.swap)
        h = fp8_gemm.swiglu_fp8_quant_triton(fp8_gemm.grouped_fp8_linear_triton(xq[0], ws[0][0], ws[0][1], counts, x_scale=xq[1], out_dtype=x.dtype, src=src, **tiles))
        ref = {}
        for eg in (0, 1, 2, 0):
            fp8_gemm.EXPERT_GRID = eg
            outs = (
                fp8_gemm.grouped_fp8_linear_triton(xq[0], ws[0][0], ws[0][1], counts, x_scale=xq[1], out_dtype=x.dtype, src=src, **tiles),
                fp8_gemm.grouped_fp8_linear_triton(h[0], ws[0][2], ws[0][3], counts, x_scale=h[1], out_dtype=x.dtype, **tiles),
                fp8_gemm.grouped_fp8_experts(x, counts, *ws[0], src, xq=xq),
            )
            same = all(torch.equal(a, b) for a, b in zip(outs, ref.get(0, outs)))
            ref.setdefault(0, outs)
            t1 = bench_graph([lambda w=w: fp8_gemm.grouped_fp8_linear_triton(xq[0], w[0], w[1], counts, x_scale=xq[1], out_dtype=x.dtype, src=src, **tiles) for w in ws], 10)
            t2 = bench_graph([lambda w=w: fp8_gemm.grouped_fp8_linear_triton(h[0], w[2], w[3], counts, x_scale=h[1], out_dtype=x.dtype, **tiles) for w in ws], 10)
            t3 = bench_graph([lambda w=w: fp8_gemm.grouped_fp8_experts(x, counts, *w, src, xq=xq) for w in ws], 10)
            rows.append((tokens, eg, t1, t2, t3, same, int((counts == 0).sum())))
            print(rows[-1], flush=True)
    print("\n| tokens | EXPERT_GRID | gate_up us | down us | whole MLP us | bitwise | empty experts |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]} | {r[6]} |")


if __name__ == "__main__":
    main()
