"""Model core: one transformer family configured from HF config.json.

Supports Qwen3MoeForCausalLM, DeepseekV3ForCausalLM (MLA, shared experts, MTP), Qwen3ForCausalLM
and LlamaForCausalLM; logits match transformers' implementation on the same weights. MoE layers
record and replay their expert choices (R3).
"""

from miles_core.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from miles_core.model.loader import (
    build_model,
    init_weights,
    iter_hf_tensors,
    load_model,
    load_model_from_tensors,
    load_tokenizer,
)
from miles_core.model.mtp import mtp_logits, mtp_loss
from miles_core.model.saving import save_hf_checkpoint
from miles_core.model.transformer import CausalLM, ModelOutput
from miles_core.model.weights import miles_to_hf

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "ModelConfig",
    "ModelOutput",
    "build_model",
    "init_weights",
    "iter_hf_tensors",
    "load_model",
    "load_model_from_tensors",
    "load_tokenizer",
    "miles_to_hf",
    "mtp_logits",
    "mtp_loss",
    "save_hf_checkpoint",
]
