"""miles' torch_dist checkpoints against megatron-core itself (optional dependency, tests marked slow).

A megatron-core GPTModel is built on the CPU with the local (non-Transformer-Engine) layer spec for the
same tiny configs. Proves: (1) the keys, shapes and chunking miles writes are exactly what that model's
`sharded_state_dict()` asks for; (2) `dist_checkpointing.load` fills it from a miles checkpoint and its
logits equal miles' (fp32); (3) a checkpoint megatron-core saves loads into miles with the same logits.
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

from miles_core.checkpoint import hf_to_torch_dist, load_torch_dist
from miles_core.model import load_model
from tests.tiny_models import VOCAB, deepseek_v3_config, llama_config, qwen3_config, qwen3_moe_config, save_hf

megatron = pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
pytestmark = pytest.mark.slow

CONFIGS = {
    # mixed dense/MoE layers: megatron keys every layer on its own
    "qwen3_moe_mixed": lambda: qwen3_moe_config(),
    # all MoE: megatron stacks layers on one axis
    "qwen3_moe": lambda: qwen3_moe_config(mlp_only_layers=[], num_hidden_layers=2),
    "qwen3": lambda: qwen3_config(tie_word_embeddings=False),
    "qwen3_tied": lambda: qwen3_config(),
    "llama": lambda: llama_config(attention_bias=False, rope_scaling=None),
}


@pytest.fixture(scope="module")
def megatron_world():
    """One-rank gloo process group and megatron's parallel state, torn down after the module."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    with pytest.MonkeyPatch.context() as mp, socket.socket() as sock:
        # megatron's save path syncs and puts a flag tensor on the current CUDA device: CPU here
        mp.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        # dropout is 0: the CUDA RNG tracker that forks around it has nothing to do on a CPU
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        mp.setattr(get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
        import megatron.core.transformer.moe.moe_utils as moe_utils

        mp.setattr(moe_utils, "te_general_gemm", None, raising=False)  # no Transformer Engine: torch.mm
        yield
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def megatron_gpt(hf_cfg, num_mtp: int = 0):
    """A megatron-core GPTModel (local spec, fp32, CPU) equivalent to an HF Qwen3/Qwen3-MoE/Llama config."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    c = hf_cfg.to_dict()
    kw = dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        num_attention_heads=c["num_attention_heads"],
        num_query_groups=c["num_key_value_heads"],
        kv_channels=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        ffn_hidden_size=c["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=c["rms_norm_eps"],
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        qk_layernorm=c["model_type"] in ("qwen3", "qwen3_moe"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        mtp_num_layers=num_mtp or None,
    )
    if c["model_type"] == "qwen3_moe":
        n = c["num_hidden_layers"]
        freq = [0 if i in (c.get("mlp_only_layers") or []) else 1 for i in range(n)]
        kw.update(
            num_moe_experts=c.get("num_experts") or c["num_local_experts"],
            moe_router_topk=c["num_experts_per_tok"],
            moe_ffn_hidden_size=c["moe_intermediate_size"],
            moe_router_pre_softmax=not c["norm_topk_prob"],
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="allgather",
            moe_layer_freq=freq if 0 in freq else 1,
        )
    cfg = TransformerConfig(**kw)
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    mtp = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False) if num_mtp else None
    theta = (c.get("rope_parameters") or {}).get("rope_theta") or c.get("rope_theta", 10000.0)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=c["vocab_size"],
        max_sequence_length=256,
        position_embedding_type="rope",
        rotary_base=theta,
        share_embeddings_and_output_weights=c.get("tie_word_embeddings", False),
        mtp_block_spec=mtp,
    ).eval()


def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    t = ids.shape[1]
    pos = torch.arange(t)[None].expand_as(ids)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)[None, None]  # True = masked out
    with torch.no_grad():
        return model(ids, pos, mask).float()


def _ids(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(0))


def _layout(sharded_state_dict) -> dict[str, tuple]:
    """key -> (global shape, sorted chunk offsets) of what a megatron model saves, objects by unique key."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory, apply_factories
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    apply_factories(sharded_state_dict)
    base, _ = extract_sharded_base(sharded_state_dict)
    out: dict[str, tuple] = {}
    for sh in _leaves(base):
        if isinstance(sh, ShardedObject):
            out[sh.unique_key] = ("object",)
        elif not isinstance(sh, ShardedTensorFactory):
            shape, chunks = out.get(sh.key, (tuple(sh.global_shape), []))
            chunks.append(tuple(sh.global_offset))
            out[sh.key] = (shape, chunks)
    return {k: v if v == ("object",) else (v[0], sorted(v[1])) for k, v in out.items()}


def _leaves(d):
    for v in d.values() if isinstance(d, dict) else d:
        if isinstance(v, (dict, list)):
            yield from _leaves(v)
        else:
            yield v


def _miles_layout(ckpt: str) -> dict[str, tuple]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(os.path.join(ckpt, "iter_0000000")).read_metadata()
    out = {}
    for k, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            out[k] = (tuple(v.size), sorted(tuple(c.offsets) for c in v.chunks))
        else:
            out[k] = ("object",)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_miles_checkpoint_has_megatron_keys_shapes_and_chunks(name, tmp_path, megatron_world):
    cfg = CONFIGS[name]()
    hf, _ = save_hf(cfg, str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    ours, theirs = _miles_layout(ckpt), _layout(megatron_gpt(cfg).sharded_state_dict())
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        if v == ("object",):
            continue
        # megatron splits linear_fc1 into gate/up chunks exactly as miles does: same offsets.
        assert ours[k] == v, k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_megatron_loads_miles_checkpoint_with_identical_logits(name, tmp_path, megatron_world):
    from megatron.core import dist_checkpointing

    cfg = CONFIGS[name]()
    hf, _ = save_hf(cfg, str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    mg = megatron_gpt(cfg)
    # as Megatron-LM loads it: the model under "model", common.pt's entries beside it
    state = dist_checkpointing.load({"model": mg.sharded_state_dict()}, os.path.join(ckpt, "iter_0000000"))
    assert state["iteration"] == 0 and state["checkpoint_version"] == 3.0
    mg.load_state_dict(state["model"])
    ids = _ids()
    ref = load_model(hf).eval()(ids).logits
    torch.testing.assert_close(megatron_logits(mg, ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_moe_mixed", "qwen3_moe", "qwen3", "llama"])
def test_megatron_saved_checkpoint_loads_into_miles_with_identical_logits(name, tmp_path, megatron_world):
    from megatron.core import dist_checkpointing

    cfg = CONFIGS[name]()
    torch.manual_seed(1)
    mg = megatron_gpt(cfg)
    with torch.no_grad():
        for n, p in mg.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.05 * torch.randn_like(p))
    ckpt = tmp_path / "td"
    (ckpt / "iter_0000007").mkdir(parents=True)
    dist_checkpointing.save({"model": mg.sharded_state_dict(), "iteration": 7}, str(ckpt / "iter_0000007"))
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7")
    cfg.save_pretrained(str(ckpt))  # the HF config.json beside it
    model = load_torch_dist(str(ckpt)).eval()
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, megatron_logits(mg, ids), rtol=1e-5, atol=1e-5)


def test_megatron_mtp_layer_keys_match_miles_created_mtp(tmp_path, megatron_world):
    cfg = CONFIGS["qwen3_moe"]()
    hf, _ = save_hf(cfg, str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"), mtp_num_layers=1)
    ours, theirs = _miles_layout(ckpt), _layout(megatron_gpt(cfg, num_mtp=1).sharded_state_dict())
    assert set(ours) == set(theirs)
    assert all(ours[k] == v for k, v in theirs.items() if v != ("object",))


def _patch_mla_for_cpu(mp) -> None:
    """megatron-core 0.16's local MLA spec cannot be built without Transformer Engine: its
    DotProductAttention rejects k_channels/v_channels, and a mocked TE makes an isinstance check fail.
    Neither touches parameter names or shapes, which is all the layout test needs."""
    import megatron.core.transformer.dot_product_attention as dpa
    import megatron.core.transformer.multi_latent_attention as mla

    init = dpa.DotProductAttention.__init__
    mp.setattr(
        dpa.DotProductAttention, "__init__", lambda self, *a, k_channels=None, v_channels=None, **k: init(self, *a, **k)
    )
    mp.setattr(mla, "HAVE_TE", False)
    mp.setattr(mla, "TELinear", type("NoTELinear", (), {}))


def megatron_deepseek_v3(hf_cfg, num_mtp: int):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    c = hf_cfg.to_dict()
    n = c["num_hidden_layers"]
    cfg = MLATransformerConfig(
        num_layers=n, hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        ffn_hidden_size=c["intermediate_size"], normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32,
        multi_latent_attention=True, q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
        qk_head_dim=c["qk_nope_head_dim"], qk_pos_emb_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
        qk_layernorm=True, rope_type="rope", num_moe_experts=c["n_routed_experts"],
        moe_router_topk=c["num_experts_per_tok"], moe_ffn_hidden_size=c["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=c["moe_intermediate_size"] * c["n_shared_experts"],
        moe_layer_freq=[0 if i < c["first_k_dense_replace"] else 1 for i in range(n)],
        moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid", mtp_num_layers=num_mtp,
    )  # fmt: skip
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    mtp = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False)
    return GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=c["vocab_size"], max_sequence_length=256,
        position_embedding_type="rope", share_embeddings_and_output_weights=False, mtp_block_spec=mtp,
    )  # fmt: skip


def test_deepseek_v3_with_mtp_has_megatron_mla_keys_shapes_and_chunks(tmp_path, megatron_world):
    from tests.tiny_models import add_mtp_layer

    cfg = deepseek_v3_config()
    hf, _ = save_hf(cfg, str(tmp_path / "hf"))
    add_mtp_layer(hf, cfg)
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    with pytest.MonkeyPatch.context() as mp:
        _patch_mla_for_cpu(mp)
        theirs = _layout(megatron_deepseek_v3(cfg, num_mtp=1).sharded_state_dict())
    ours = _miles_layout(ckpt)
    assert set(ours) == set(theirs)
    assert all(ours[k] == v for k, v in theirs.items() if v != ("object",))
    assert "mtp.layers.0.transformer_layer.self_attention.linear_kv_up_proj.weight" in ours
    assert "decoder.layers.1.mlp.router.expert_bias" in ours
