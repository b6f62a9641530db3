"""Low precision: FP8 128x128-block and INT4 group quantization, QAT fake-quant, quantized layers,
and the quantize stage that writes FP8 (DeepSeek-V3 style) or INT4 (compressed-tensors W4A16)
rollout checkpoints. The same quantize functions serve the checkpoint writer, the quantized layers
and QAT, so that rollout and training see the same numbers. Triton is imported lazily, on CUDA only.
"""

from miles_core.quant.checkpoint import quantize_checkpoint
from miles_core.quant.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    check_finite,
    fp8_act_dequantize,
    fp8_act_quantize_reference,
    fp8_block_dequantize,
    fp8_block_quantize,
)
from miles_core.quant.hf_format import dequantize_hf_tensors, fp8_quant_config, int4_quant_config
from miles_core.quant.int4 import int4_group_dequantize, int4_group_quantize, pack_int4, unpack_int4
from miles_core.quant.layers import Fp8Linear, Int4Linear, QuantExperts, quantize_model_
from miles_core.quant.qat import QATLinear, disable_qat, enable_qat, fake_quant, fake_quant_fp8, fake_quant_int4

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "Fp8Linear",
    "Int4Linear",
    "QATLinear",
    "QuantExperts",
    "check_finite",
    "dequantize_hf_tensors",
    "disable_qat",
    "enable_qat",
    "fake_quant",
    "fake_quant_fp8",
    "fake_quant_int4",
    "fp8_act_dequantize",
    "fp8_act_quantize_reference",
    "fp8_block_dequantize",
    "fp8_block_quantize",
    "fp8_quant_config",
    "int4_group_dequantize",
    "int4_group_quantize",
    "int4_quant_config",
    "pack_int4",
    "quantize_checkpoint",
    "quantize_model_",
    "unpack_int4",
]
