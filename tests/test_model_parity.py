"""miles logits equal transformers' logits on the same saved checkpoint (fp32, CPU, max abs diff <= 1e-4)."""

import pytest
import torch

from miles_core.model import load_model
from tests.tiny_models import CONFIGS, VOCAB, save_hf

TOL = 1e-4


def _ids(b=3, t=17, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_logits_match_transformers(arch, tmp_path):
    cfg = CONFIGS[arch]()
    path, hf = save_hf(cfg, str(tmp_path / arch))
    model = load_model(path)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids).logits
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"{arch}: max abs diff {diff:.2e}"


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_logits_match_from_sharded_checkpoint(arch, tmp_path):
    cfg = CONFIGS[arch]()
    path, hf = save_hf(cfg, str(tmp_path / arch), max_shard_size="60KB")
    import os

    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    model = load_model(path)
    ids = _ids(2, 11, seed=1)
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff <= TOL


def test_tied_embeddings_share_one_tensor(tmp_path):
    from miles_core.model import build_model, init_weights
    from miles_core.model.config import ModelConfig
    from miles_core.model.saving import save_hf_checkpoint

    cfg = CONFIGS["qwen3"](tie_word_embeddings=True)
    path, _ = save_hf(cfg, str(tmp_path / "tied"))
    model = load_model(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fresh = init_weights(build_model(ModelConfig.from_hf(cfg.to_dict() | {"architectures": cfg.architectures})))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    with torch.no_grad():
        fresh.lm_head.weight.mul_(2.0)  # training the head trains the embedding: one tensor
    save_hf_checkpoint(fresh, str(tmp_path / "saved"))
    ids = _ids(1, 6)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "saved"))(ids).logits, fresh(ids).logits)


def test_padded_batch_matches_unpadded_rows(tmp_path):
    """Left padding with an attention mask gives each row the logits it has alone."""
    path, hf = save_hf(CONFIGS["qwen3_moe"](), str(tmp_path / "m"))
    model = load_model(path)
    a, b = _ids(1, 9, seed=2), _ids(1, 5, seed=3)
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(b).logits
        ref = hf(ids, attention_mask=mask).logits
    assert (batched[1, 4:] - alone[0]).abs().max().item() <= TOL
    assert (batched[:, -1] - ref[:, -1]).abs().max().item() <= TOL
