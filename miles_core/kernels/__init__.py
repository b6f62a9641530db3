"""GPU kernels (Triton, torch's cuBLAS paths), each with a pure-torch reference that is the CPU path.

`DECODE_FUSION` switches the decode-size fused kernels (one-launch MoE routing, the fused
rope/qk-norm/KV-write, FP8 small-M GEMMs with the activation quantization inside): on by default;
`MILES_DECODE_FUSION=0` or setting it False before an engine captures its graphs measures what they
save (bench/rollout.py --unfused). Numerics are the same either way up to float32 reduction order.

`EXPERT_FUSION` (with `DECODE_FUSION`) switches the MoE experts' launch fusions alone: the row gather
and SwiGLU folded into the bf16 grouped GEMM, into the FP8 activation quantization (and the gather
into the INT4 GEMM), and FP8 experts' rows quantized by the RMSNorm before the MoE in the engine's
fused layer loop (`add_norm.add_rms_norm(quant=True)`, gathered by the FP8 GEMM). These give the
unfused launches' bits, so turning them off (`MILES_EXPERT_FUSION=0`) changes the timing only;
`DECODE_FUSION` off also changes the GEMM kernels.

`W4A16_MMA` switches INT4 dense layers at 2-32 rows onto the Gluon tensor-core kernel
(`w4a16_mma`); `MILES_W4A16_MMA=0` keeps them on the Triton kernels. Gluon is Triton's experimental
layer, so if the kernel does not compile on the installed Triton the first call warns, sets this
False and falls back.

`FP8_GLUON` runs large FP8 linears (`fp8_gemm.GLUON_MIN_TILES` output tiles and up, on sm_90) on the Gluon block-scaled
GEMM (`fp8_wgmma`) instead of cuBLAS's: the same bits on the H200 and 0.98-1.05x of cuBLAS's speed over
two runs of four shapes, seven of the eight faster (bench/RESULTS.md, tenth session), and the FP8 MoE
experts from `fp8_gemm.GLUON_GROUPED_MIN_M` rows on its grouped form (`fp8_wgmma_grouped`) instead of the
Triton grouped kernel (1.35-1.42x faster at a prefill chunk's 262k rows, twelfth session; 1.05-1.52x at 4k-16k
rows, seventeenth), and from `fp8_gemm.DECODE_GLUON_MIN_M` rows (batch 256 x top-8) below that on its decode
form (`fp8_wgmma_decode`: the weights on wgmma's M side; gate_up 1.10x of the Triton kernel at 2,048 rows).
`MILES_FP8_GLUON=0` keeps cuBLAS and Triton. A compile failure warns once and falls back for the rest of the
process (the dense kernel sets `FP8_GLUON` False, the grouped ones their own flag).
"""

import contextlib
import os

DECODE_FUSION = os.environ.get("MILES_DECODE_FUSION", "1") != "0"
EXPERT_FUSION = os.environ.get("MILES_EXPERT_FUSION", "1") != "0"
W4A16_MMA = os.environ.get("MILES_W4A16_MMA", "1") != "0"
FP8_GLUON = os.environ.get("MILES_FP8_GLUON", "1") != "0"


@contextlib.contextmanager
def fusion(decode: bool | None = None, experts: bool | None = None):
    """Set `DECODE_FUSION` / `EXPERT_FUSION` for a block (benchmarks, tests), restored after. The flags
    are read at each call, so a CUDA graph captured inside the block keeps that block's kernels."""
    global DECODE_FUSION, EXPERT_FUSION
    old = DECODE_FUSION, EXPERT_FUSION
    DECODE_FUSION = old[0] if decode is None else decode
    EXPERT_FUSION = old[1] if experts is None else experts
    try:
        yield
    finally:
        DECODE_FUSION, EXPERT_FUSION = old
