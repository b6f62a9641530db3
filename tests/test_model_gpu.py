"""GPU path (bf16, CUDA): grouped-GEMM experts and SDPA attention agree with transformers.

Tolerance, stated: with both sides in bf16 and an fp32 transformers forward as the reference, miles'
max abs logit error must be at most 2x transformers' own bf16 error + 1e-2, and miles' argmax must
agree with the fp32 reference on at least as many positions as transformers' bf16 argmax does, less
2 points (bf16 flips near-tied router choices in tiny random MoEs, for both implementations).
Run on the device: `pytest -m gpu`.
"""

import pytest
import torch

from miles_core.kernels.grouped_gemm import grouped_linear, grouped_linear_reference
from miles_core.model import load_model
from tests.tiny_models import CONFIGS, save_hf

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_bf16_logits_match_transformers_on_gpu(arch, tmp_path):
    cfg = CONFIGS[arch](hidden_size=128) if arch != "deepseek_v3" else CONFIGS[arch]()
    path, hf = save_hf(cfg, str(tmp_path / arch))
    ids = torch.randint(0, cfg.vocab_size, (4, 64), device="cuda")
    with torch.no_grad():
        ref = hf.cuda()(ids).logits.float()
        hf_bf16 = hf.to(torch.bfloat16)(ids).logits.float()
        miles = load_model(path, device="cuda", dtype=torch.bfloat16)
        got = miles(ids).logits.float()
    err_hf = (hf_bf16 - ref).abs().max().item()
    err_miles = (got - ref).abs().max().item()
    top = ref.argmax(-1)
    agree_miles = (got.argmax(-1) == top).float().mean().item()
    agree_hf = (hf_bf16.argmax(-1) == top).float().mean().item()
    print(
        f"{arch}: max abs err vs fp32: miles bf16 {err_miles:.3e}, transformers bf16 {err_hf:.3e}; "
        f"argmax agreement with fp32: miles {agree_miles:.3f}, transformers {agree_hf:.3f}"
    )
    assert err_miles <= 2 * err_hf + 1e-2
    assert agree_miles >= agree_hf - 0.02


@pytest.mark.parametrize("e,k,m", [(8, 64, 96), (128, 2048, 1536), (16, 256, 512)])
def test_grouped_gemm_matches_reference(e, k, m):
    torch.manual_seed(0)
    counts = torch.randint(0, 50, (e,), device="cuda")
    counts[0] = 0  # an empty expert
    n = int(counts.sum())
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(e, m, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    got = grouped_linear(x, w, counts)
    ref = grouped_linear_reference(x.float(), w.float(), counts)
    rel = ((got.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


def test_replay_bit_identical_on_gpu(tmp_path):
    path, _ = save_hf(CONFIGS["qwen3_moe"](hidden_size=128), str(tmp_path / "m"))
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (3, 40), device="cuda")
    with torch.no_grad():
        rec = model(ids, return_routed_experts=True)
        rep = model(ids, routed_experts=rec.routed_experts)
    assert torch.equal(rec.logits, rep.logits)
