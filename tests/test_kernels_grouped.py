"""The decode-size grouped GEMM (miles_core.kernels.grouped_triton) held to the pure-torch reference.

CPU: the kernel runs under the Triton interpreter (a subprocess, TRITON_INTERPRET=1) in fp32 and
fp16 on ragged expert counts (experts with no rows, one row, more rows than a tile), K a multiple
of the block and not. GPU (`-m gpu`): bf16 at the Qwen3-30B-A3B decode shapes (gate_up [128, 1536,
2048] and down [128, 2048, 768], 512 and 2048 sorted rows) with the output poisoned, against the
reference in float32 on the same bf16 operands: ||out - ref|| / ||ref|| <= 5e-3 (bf16 output
rounding), and against torch._grouped_mm.
"""

from __future__ import annotations

import pytest
import torch

from miles_core.kernels.grouped_gemm import grouped_linear_reference
from tests.test_kernels_quant import _run_interpreted

pytest.importorskip("triton")

# (experts, N, K, counts)
CASES = [
    (4, 24, 40, [3, 0, 17, 1]),
    (6, 64, 128, [0, 0, 5, 40, 2, 0]),
    (3, 40, 200, [16, 16, 1]),
]


def _case(e, n, k, counts, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g).to(device, dtype)
    w = (torch.randn(e, n, k, generator=g) / k**0.5).to(device, dtype)
    return x, w, torch.tensor(counts, device=device)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def interp_grouped() -> None:
    from miles_core.kernels.grouped_triton import grouped_linear_triton

    for i, case in enumerate(CASES):
        for dtype, bound in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
            x, w, counts = _case(*case, dtype, "cpu", i)
            for cfg in (None, dict(BM=16, BN=16, BK=32, num_stages=1)):
                got = grouped_linear_triton(x, w, counts, cfg)
                ref = grouped_linear_reference(x.float(), w.float(), counts)
                assert _rel(got, ref) <= bound, (case, dtype, cfg, _rel(got, ref))


def test_grouped_kernel_matches_reference_in_interpreter():
    _run_interpreted("interp_grouped", "tests.test_kernels_grouped")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rows", [512, 2048])
@pytest.mark.parametrize("n,k", [(1536, 2048), (2048, 768)])
def test_gpu_grouped_kernel_matches_reference_bf16(rows, n, k):
    from miles_core.kernels.grouped_triton import grouped_linear_triton

    g = torch.Generator().manual_seed(rows + n)
    experts = torch.randint(0, 128, (rows,), generator=g)
    experts[:5] = 3  # one busy expert (several row tiles)
    counts = torch.bincount(experts, minlength=128)
    x = torch.randn(rows, k, generator=g).cuda().bfloat16()
    w = (torch.randn(128, n, k, generator=g) / k**0.5).cuda().bfloat16()
    counts = counts.cuda()
    junk = torch.empty(rows * n * 2, dtype=torch.uint8, device="cuda").fill_(0xFF)  # NaN in freed memory
    del junk
    with torch.inference_mode():
        got = grouped_linear_triton(x, w, counts)
        ref = grouped_linear_reference(x.float(), w.float(), counts)
        cutlass = torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.cumsum(counts, 0, dtype=torch.int32))
    assert not got.isnan().any()
    assert _rel(got, ref) <= 5e-3 and _rel(cutlass, ref) <= 5e-3
