"""Shared pieces of the GPU benchmarks: the reference model shape, timing, and the GEMM ceiling."""

from __future__ import annotations

import torch

# Qwen3-30B-A3B cut to a few layers (see shared BASELINES.md).
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)


def bench_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of fn() in ms, CUDA-synchronised (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def gemm_ceiling_tflops(n: int = 8192) -> float:
    """bf16 `a @ b.t()` n^3 TFLOP/s measured now: the MFU denominator."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b.t(), warmup=5, reps=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def moe_forward_flops(cfg: dict, layers: int, batch: int, seq: int, with_head: bool = True) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): projections, active experts, router,
    causal attention scores (half of the T x T square), LM head."""
    h, hd, nq, nkv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    k, i, e = cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["num_experts"]
    tokens = batch * seq
    per_token = 2 * h * (nq * hd + 2 * nkv * hd) + 2 * nq * hd * h  # qkv + o
    per_token += 2 * k * 3 * h * i + 2 * h * e  # active experts + router
    attn = 2 * 2 * batch * nq * hd * seq * seq / 2  # QK^T and PV, causal half
    total = layers * (per_token * tokens + attn)
    if with_head:
        total += 2 * tokens * h * cfg["vocab_size"]
    return total


def build_pair(raw: dict, device, dtype: torch.dtype):
    """transformers' model with random weights, and a miles model over the very same tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from miles_core.model import build_model
    from miles_core.model.config import ModelConfig

    hf_cfg = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    hf_cfg.architectures = raw["architectures"]
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    miles = build_model(ModelConfig.from_hf(raw), device=device, dtype=dtype)
    missing, unexpected = miles.load_state_dict(hf.state_dict(), strict=False, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    return hf, miles
