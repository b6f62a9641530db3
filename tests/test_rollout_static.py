"""The GPU path's pieces, checked on the CPU: static all-slot decode (what CUDA graphs replay),
the capture-safe MoE, and the decode attention (grouped GQA, absorbed MLA) against SDPA. The
CUDA-graph capture itself is in the `gpu`-marked test at the end (run on the device)."""

import pytest
import torch

from miles_core.model.attention import MLAttention, attend
from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams
from miles_core.rollout.runner import decode_attention, moe_forward
from tests.test_rollout_fixtures import one_thread, ragged_prompts, tiny  # noqa: F401
from tests.tiny_models import CONFIGS


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_static_all_slot_decode_equals_dynamic_decode(arch):
    _, _, model = tiny(arch)
    prompts = ragged_prompts((5, 11, 3, 8), seed=9)
    sp = SamplingParams(temperature=0.8, max_new_tokens=12, ignore_eos=True, seed=3)
    reqs = [Request(f"p{i}", p, sp, n_samples=2) for i, p in enumerate(prompts)]
    ref = Engine(model, config=EngineConfig(max_slots=3, max_len=48)).generate(reqs)
    got = Engine(model, config=EngineConfig(max_slots=3, max_len=48, static_decode=True, graph_len_bucket=8)).generate(
        reqs
    )
    for a, b in zip(got, ref, strict=True):
        assert a.response_tokens == b.response_tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-5
        assert (a.experts is None and b.experts is None) or torch.equal(a.experts, b.experts)


def test_warmup_captures_nothing_without_cuda_graphs_and_refuses_mid_round():
    from miles_core.errors import MilesError

    _, _, model = tiny("qwen3_moe")
    engine = Engine(model, config=EngineConfig(max_slots=2, max_len=32, static_decode=True, graph_len_bucket=8))
    assert engine.warmup() == 0 and Engine(model, config=EngineConfig(max_slots=2, max_len=32)).warmup() == 0
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    engine.scheduler.enqueue(engine.samples_for([Request("p", [1, 2, 3], sp)]))
    engine.step()
    with pytest.raises(MilesError, match="between rounds"):
        engine.warmup()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3"])
def test_lookahead_decode_equals_dynamic_decode_with_staggered_stops_and_budget_rounds(arch, monkeypatch):
    """Every sample fits in a slot, so static decode queues each step before the previous one's
    tokens are read: samples stopping at different steps (max_new_tokens, a stop token, max_len),
    sampled and greedy rows together, and a partial rollout cut by a budget mid-lookahead all give
    the dynamic engine's tokens, log-probs and experts."""
    from miles_core.rollout import Budget, PartialRollout

    _, _, model = tiny(arch)
    prompts = ragged_prompts((5, 11, 3, 8), seed=12)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=9, ignore_eos=True, seed=1),
        SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True),
        SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, seed=2),
        SamplingParams(temperature=0.7, max_new_tokens=30, stop_token_ids=[5, 17, 40, 61], seed=3),
    ]
    reqs = [Request(f"p{i}", p, sp, n_samples=2) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    ahead = []
    launch = Engine._launch
    monkeypatch.setattr(Engine, "_launch", lambda self, r, ahead_: ahead.append(ahead_) or launch(self, r, ahead_))

    def run(static: bool, budget: int | None):
        engine = Engine(model, config=EngineConfig(max_slots=8, max_len=32, static_decode=static, graph_len_bucket=8))
        if budget is None:
            return engine.generate(reqs)
        partial = PartialRollout(engine, Budget(tokens=budget))
        rounds = [partial.run_round(reqs)]
        while partial.carried:
            rounds.append(partial.run_round())
        assert len(rounds) > 2
        return sorted(
            (s for r in rounds for g in r.groups for s in g), key=lambda s: (s.request.prompt_id, s.sample_index)
        )

    for budget in (None, 19):
        ref = run(False, budget)
        got = run(True, budget)
        assert len({len(s.response_tokens) for s in got}) > 2  # stops at different steps
        for a, b in zip(got, ref, strict=True):
            assert a.response_tokens == b.response_tokens and a.finish_reason == b.finish_reason
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= 1e-5
            assert (a.experts is None and b.experts is None) or torch.equal(a.experts, b.experts)
    assert ahead.count(1) > 20 and ahead.count(0) < ahead.count(1)  # mostly queued ahead


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_capture_safe_moe_equals_the_model_moe_bitwise(arch):
    _, _, model = tiny(arch)
    layer = model.model.layers[model.moe_layer_ids[0]]
    h = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_experts = layer.mlp(h, None)
        got, experts = moe_forward(layer.mlp, h)
    assert torch.equal(got, ref) and torch.equal(experts, ref_experts)


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_decode_attention_equals_sdpa_over_expanded_cache(arch):
    _, _, model = tiny(arch)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(1)
    b, t, L = 3, 2, 9
    x = torch.randn(b, L, model.config.hidden_size, generator=g)
    pos = torch.arange(L)[None].expand(b, L)
    cos, sin = model.model.rotary(pos, x.dtype)
    mask = torch.rand(b, 1, t, L, generator=g) > 0.3
    mask[..., 0] = True
    with torch.no_grad():
        if isinstance(attn, MLAttention):
            q = attn.query(x[:, -t:], cos[:, -t:], sin[:, -t:])
            a, kr = attn.latent(x, cos, sin)
            k, v = attn.expand(a, kr)
            got = decode_attention(attn, q, a, kr, mask)
        else:
            q, k, v = attn.qkv(x, cos, sin)
            q = q[:, -t:]
            got = decode_attention(attn, q, k, v, mask)
        ref = attend(q, k, v, mask, attn.scale)
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_cuda_graph_decode_matches_eager_decode_on_gpu(arch, tmp_path):
    from miles_core.model import load_model
    from tests.tiny_models import save_hf

    path, _ = save_hf(CONFIGS[arch](hidden_size=128) if arch == "qwen3_moe" else CONFIGS[arch](), str(tmp_path / arch))
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    reqs = [Request(f"p{i}", p, SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)) for i, p in
            enumerate(ragged_prompts((5, 30, 12), seed=10))]  # fmt: skip
    eager = Engine(model, config=EngineConfig(max_slots=4, max_len=128, static_decode=True)).generate(reqs)
    graphs = Engine(model, config=EngineConfig(max_slots=4, max_len=128, cuda_graphs=True, graph_len_bucket=32))
    got = graphs.generate(reqs)
    assert [s.response_tokens for s in got] == [s.response_tokens for s in eager]
    assert graphs._graphs._graphs  # at least one graph was captured and replayed


@pytest.mark.gpu
def test_warmup_captures_every_bucket_and_generation_then_captures_none(tmp_path):
    from miles_core.model import load_model
    from tests.tiny_models import save_hf

    path, _ = save_hf(CONFIGS["qwen3_moe"](hidden_size=128), str(tmp_path / "m"))
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    reqs = [Request(f"p{i}", p, SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)) for i, p in
            enumerate(ragged_prompts((5, 30, 12), seed=11))]  # fmt: skip
    cold = Engine(model, config=EngineConfig(max_slots=4, max_len=128, cuda_graphs=True, graph_len_bucket=32))
    want = cold.generate(reqs)
    warm = Engine(model, config=EngineConfig(max_slots=4, max_len=128, cuda_graphs=True, graph_len_bucket=32))
    assert warm.warmup() == 4 and warm.warmup() == 0  # lengths 32, 64, 96, 128; then nothing new
    captured = set(warm._graphs._graphs)
    got = warm.generate(reqs)
    assert set(warm._graphs._graphs) == captured
    assert [s.response_tokens for s in got] == [s.response_tokens for s in want]


def test_capture_blocker_names_experts_a_cuda_graph_cannot_capture():
    """CUDA graphs need the experts' GEMMs to take their row counts on the device: fp32 bf16-class
    experts and INT4 experts on fp32 activations are refused up front (the engine raises before any
    capture), bf16 models and FP8 experts pass; dense models have nothing to refuse."""
    import copy

    from miles_core.quant import quantize_model_
    from miles_core.rollout.graphs import capture_blocker

    fp32 = tiny("qwen3_moe")[2]
    assert "float32 experts" in capture_blocker(fp32)
    assert capture_blocker(copy.deepcopy(fp32).bfloat16()) is None
    int4 = copy.deepcopy(fp32)
    quantize_model_(int4, "int4", group_size=32)
    assert "INT4 experts" in capture_blocker(int4)
    assert capture_blocker(copy.deepcopy(int4).bfloat16()) is None
    fp8 = copy.deepcopy(tiny("qwen3_moe", moe_intermediate_size=128)[2])  # FP8 blocks want I % 128 == 0
    quantize_model_(fp8, "fp8", scope="experts")
    assert capture_blocker(fp8) is None
    assert capture_blocker(tiny("qwen3")[2]) is None
