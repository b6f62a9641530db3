"""GPU kernels (Triton, torch's cuBLAS paths), each with a pure-torch reference that is the CPU path.

`DECODE_FUSION` switches the decode-size fused kernels (one-launch MoE routing, the fused
rope/qk-norm/KV-write, FP8 small-M GEMMs with the activation quantization inside): on by default;
`MILES_DECODE_FUSION=0` or setting it False before an engine captures its graphs measures what they
save (bench/rollout.py --unfused). Numerics are the same either way up to float32 reduction order.
"""

import os

DECODE_FUSION = os.environ.get("MILES_DECODE_FUSION", "1") != "0"
