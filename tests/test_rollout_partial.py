"""Partial rollout (budgeted rounds, resumed samples, per-token weight versions) and in-place
weight updates from a trainer model."""

import copy

import pytest
import torch

from miles_core.errors import MilesError
from miles_core.rl.logits import token_logprobs
from miles_core.rollout import Budget, Engine, EngineConfig, PartialRollout, Request, SamplingParams
from tests.test_rollout_fixtures import one_thread, ragged_prompts, tiny  # noqa: F401

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=14, ignore_eos=True)


def _requests(sp=GREEDY, n=2):
    return [Request(f"p{i}", p, sp, n_samples=n) for i, p in enumerate(ragged_prompts((5, 9, 3), seed=8))]


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_resumed_partial_rollout_equals_uninterrupted_greedy(arch):
    _, _, model = tiny(arch)
    full = Engine(model, config=EngineConfig(max_slots=4, max_len=64)).generate(_requests())
    engine = Engine(model, config=EngineConfig(max_slots=4, max_len=64))
    partial = PartialRollout(engine, Budget(tokens=10))
    rounds, groups = [partial.run_round(_requests())], []
    while partial.carried:
        engine.update_weights(model)  # same object: shared parameters, only the version moves
        rounds.append(partial.run_round())
    groups = [g for r in rounds for g in r.groups]
    assert len(rounds) > 2 and any(r.aborted for r in rounds)
    by_key = {(s.request.prompt_id, s.sample_index): s for g in groups for s in g}
    assert len(by_key) == len(full)
    resumed = 0
    for ref in full:
        got = by_key[(ref.request.prompt_id, ref.sample_index)]
        assert got.response_tokens == ref.response_tokens
        assert max(abs(a - b) for a, b in zip(got.logprobs, ref.logprobs, strict=True)) <= 1e-5
        assert torch.equal(got.experts, ref.experts)
        assert got.status == "truncated" and len(got.versions) == len(got.response_tokens)
        assert got.versions == sorted(got.versions) and got.weight_version == got.versions[0]
        if got.aborts:
            resumed += 1
            assert len(set(got.versions)) > 1 and got.rounds > 1
    assert resumed > 0


def test_aborted_sample_keeps_prefix_logprobs_experts_and_version():
    _, _, model = tiny("qwen3_moe")
    engine = Engine(model, config=EngineConfig(max_slots=8, max_len=64))
    partial = PartialRollout(engine, Budget(tokens=12))
    first = partial.run_round(_requests())
    assert not first.groups and first.aborted
    for s in first.aborted:
        assert s.status == "aborted" and s.finish_reason == "budget"
        assert 0 < len(s.response_tokens) == len(s.logprobs) == len(s.versions)
        assert s.experts.shape[0] == s.total_len - 1
        assert set(s.versions) == {0}
    engine.update_weights(model)
    partial.budget = None  # the next round runs to the end
    second = partial.run_round()
    assert len(second.groups) == 3 and not second.aborted and partial.carried == 0
    assert second.groups and {v for g in second.groups for s in g for v in s.versions} >= {0, 1}


def test_seconds_budget_parses_and_stops_a_round():
    assert Budget.parse("30s") == Budget(seconds=30.0)
    assert Budget.parse("2m") == Budget(seconds=120.0)
    assert Budget.parse("500") == Budget(tokens=500)
    with pytest.raises(MilesError):
        Budget.parse("soon")
    _, _, model = tiny("qwen3")
    partial = PartialRollout(Engine(model, config=EngineConfig(max_slots=2, max_len=64)), Budget(seconds=0.0))
    result = partial.run_round(_requests())
    assert not result.groups and partial.carried == 6


def _perturbed(model, seed=0):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return other


def test_weight_update_copies_in_place_and_changes_next_rollout():
    _, _, base = tiny("qwen3_moe")
    model = copy.deepcopy(base)
    trainer = _perturbed(base)
    engine = Engine(model, config=EngineConfig(max_slots=4, max_len=64))
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    before = engine.generate(_requests(n=1))
    assert engine.update_weights(trainer) == 1
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # no new storage
    after = engine.generate(_requests(n=1))
    assert any(a.response_tokens != b.response_tokens for a, b in zip(before, after, strict=True))
    for s in after:  # log-probs are the trainer model's
        ids = torch.tensor([s.prompt_tokens + s.response_tokens])
        with torch.no_grad():
            ref = token_logprobs(trainer(ids).logits[:, len(s.prompt_tokens) - 1 : -1], ids[:, len(s.prompt_tokens) :])
        assert (torch.tensor(s.logprobs) - ref[0]).abs().max() <= 1e-5
        assert s.versions == [1] * len(s.response_tokens) and s.weight_version == 1
    assert engine.update_weights(trainer.state_dict(), version=7) == 7


def test_shared_trainer_model_needs_no_copy():
    _, _, base = tiny("qwen3")
    trainer = copy.deepcopy(base)
    engine = Engine(trainer, config=EngineConfig(max_slots=2, max_len=64))
    before = engine.generate(_requests(n=1))
    with torch.no_grad():  # a training step, in place
        for p in trainer.parameters():
            p.mul_(1.5)
    engine.update_weights(trainer)
    after = engine.generate(_requests(n=1))
    assert engine.model is trainer and engine.version == 1
    assert any(a.logprobs != b.logprobs for a, b in zip(before, after, strict=True))


def test_weight_update_rejects_unknown_tensor_and_wrong_shape():
    _, _, base = tiny("qwen3")
    engine = Engine(copy.deepcopy(base), config=EngineConfig(max_slots=2, max_len=32))
    with pytest.raises(MilesError, match="no such tensor"):
        engine.update_weights({"model.nope.weight": torch.zeros(2)})
    with pytest.raises(MilesError, match="shape"):
        engine.update_weights({"model.norm.weight": torch.zeros(3)})
    assert engine.version == 0


def test_weight_update_requantizes_int4_experts_in_place():
    from miles_core.quant import int4_group_quantize, pack_int4, quantize_model_

    _, _, base = tiny("qwen3_moe")
    model = copy.deepcopy(base)
    quantize_model_(model, "int4", group_size=16)
    trainer = _perturbed(base, seed=1)
    engine = Engine(model, config=EngineConfig(max_slots=2, max_len=64))
    experts = model.model.layers[0].mlp.experts
    ptr = experts.gate_up_weight_packed.data_ptr()
    engine.update_weights(trainer)
    q, s = int4_group_quantize(
        trainer.model.layers[0].mlp.experts.gate_up_proj.detach(), 16, experts.gate_up_weight_scale.dtype
    )
    assert experts.gate_up_weight_packed.data_ptr() == ptr
    assert torch.equal(experts.gate_up_weight_packed, pack_int4(q)) and torch.equal(experts.gate_up_weight_scale, s)
    out = engine.generate(_requests(n=1))
    assert all(s.status == "truncated" for s in out)


def test_fp8_experts_stored_in_boxes_keep_the_checkpoint_layout_outside_and_update_in_place():
    """FP8 experts store their e4m3 weights in `tile_fp8_weights`' 8 KB boxes (the GPU kernels' layout): the
    state_dict, `fp8_weight` and a model used as a weight source speak the checkpoint's row-major layout, a
    trainer's update (requantized) and an FP8 source's e4m3 weights land in the boxes in place, and the CPU
    forward equals the same experts stored row-major."""
    from miles_core.quant import QuantExperts, fp8_block_quantize, quantize_model_
    from miles_core.quant.fp8 import tile_fp8_weights

    _, _, base = tiny("qwen3_moe", moe_intermediate_size=256, hidden_size=256)  # two K blocks: the boxes permute
    model = copy.deepcopy(base)
    quantize_model_(model, "fp8", scope="experts")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.tiled
    plain = base.model.layers[0].mlp.experts
    q1, _ = fp8_block_quantize(plain.gate_up_proj.detach())
    as_bytes = lambda t: t.view(torch.uint8)  # noqa: E731 (e4m3 has no equality on the CPU)
    assert torch.equal(as_bytes(experts.fp8_weight("gate_up")), as_bytes(q1))
    assert torch.equal(as_bytes(experts.gate_up_weight), as_bytes(tile_fp8_weights(q1)))
    assert not torch.equal(as_bytes(experts.gate_up_weight), as_bytes(q1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "model.layers.0.mlp.experts.gate_up_weight"
    assert torch.equal(as_bytes(state[key]), as_bytes(q1))  # the checkpoint's layout
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    assert torch.equal(as_bytes(clone.model.layers[0].mlp.experts.gate_up_weight), as_bytes(experts.gate_up_weight))
    # the boxes give the row-major experts' outputs on the CPU
    rows = QuantExperts(
        "fp8", experts.act, {"weight": q1, "weight_scale_inv": experts.gate_up_weight_scale_inv},
        {"weight": experts.fp8_weight("down"), "weight_scale_inv": experts.down_weight_scale_inv},
        experts.hidden, experts.inter,
    )  # fmt: skip
    rows.tiled = False
    rows.gate_up_weight, rows.down_weight = q1, experts.fp8_weight("down")
    x = torch.randn(5, experts.hidden)
    w, e = torch.rand(5, 2), torch.randint(0, experts.num_experts, (5, 2))
    assert torch.equal(experts(x, w, e), rows(x, w, e))
    # a trainer's weights: requantized into the boxes, in place
    trainer = _perturbed(base, seed=4)
    engine = Engine(model, config=EngineConfig(max_slots=2, max_len=64))
    ptr = experts.gate_up_weight.data_ptr()
    engine.update_weights(trainer)
    q2, s2 = fp8_block_quantize(trainer.model.layers[0].mlp.experts.gate_up_proj.detach())
    assert experts.gate_up_weight.data_ptr() == ptr and torch.equal(experts.gate_up_weight_scale_inv, s2)
    assert torch.equal(as_bytes(experts.fp8_weight("gate_up")), as_bytes(q2))
    # an FP8 source (its state dict, or the model itself): e4m3 weights in the checkpoint's layout
    engine.update_weights(state)
    assert torch.equal(as_bytes(experts.fp8_weight("gate_up")), as_bytes(q1))
    other = Engine(copy.deepcopy(base), config=EngineConfig(max_slots=2, max_len=64))
    quantize_model_(other.model, "fp8", scope="experts")
    other.update_weights(model)
    got = other.model.model.layers[0].mlp.experts
    assert torch.equal(as_bytes(got.gate_up_weight), as_bytes(experts.gate_up_weight))


def test_weight_update_rewrites_the_kernels_scale_copies_in_place():
    """On CUDA, INT4 layers read a cached group-major copy of their scales and an Fp8Linear at cuBLAS sizes a
    cached copy in cuBLAS's layout. A weight update rewrites both copies in place (the same storage, which a
    decode graph captured before the update keeps reading), so that no kernel runs the new weights on the
    old scales. The copies are made here as the CUDA forwards make them."""
    from miles_core.kernels.fp8_gemm import prepare_weight_scale
    from miles_core.kernels.w4a16_gemm import group_major
    from miles_core.quant import Fp8Linear, Int4Linear, QuantExperts, quantize_model_
    from miles_core.quant.layers import kernel_scales

    _, _, base = tiny("qwen3_moe", moe_intermediate_size=128)  # FP8 blocks want sizes that 128 divides
    trainer = _perturbed(base, seed=3)
    for fmt, scope in (("int4", "experts"), ("int4", "linear"), ("fp8", "linear")):
        model = copy.deepcopy(base)
        quantize_model_(model, fmt, group_size=32, scope=scope)
        kinds = (Int4Linear, QuantExperts) if fmt == "int4" else (Fp8Linear,)
        layers = [m for m in model.modules() if isinstance(m, kinds)]
        assert layers, (fmt, scope)
        copies = {}
        for layer in layers:
            if fmt == "int4":
                for name in [n for n, _ in layer.named_buffers() if n.endswith("weight_scale")]:
                    copies[layer, name] = kernel_scales(layer, name)
            else:
                layer._scale_b = prepare_weight_scale(layer.weight_scale_inv)
                copies[layer, "weight_scale_inv"] = layer._scale_b
        before = {key: c.clone() for key, c in copies.items()}
        Engine(model, config=EngineConfig(max_slots=2, max_len=64)).update_weights(trainer)
        for (layer, name), cached in copies.items():
            now = kernel_scales(layer, name) if fmt == "int4" else layer._scale_b
            want = group_major(getattr(layer, name)) if fmt == "int4" else prepare_weight_scale(layer.weight_scale_inv)
            assert now is cached and torch.equal(now, want), (fmt, scope, name)
        assert any(not torch.equal(before[key], c) for key, c in copies.items()), (fmt, scope)  # scales moved


def test_engine_on_int4_quantized_layers_matches_their_full_forward():
    """The engine runs whatever layers the model has: with INT4 experts swapped in, its log-probs
    and experts still equal one full forward of that (quantized) model."""
    from miles_core.quant import quantize_model_

    _, _, base = tiny("qwen3_moe")
    model = copy.deepcopy(base)
    quantize_model_(model, "int4", group_size=16)
    samples = Engine(model, config=EngineConfig(max_slots=3, max_len=64)).generate(
        _requests(SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=5))
    )
    for s in samples:
        ids = torch.tensor([s.prompt_tokens + s.response_tokens])
        with torch.no_grad():
            full = model(ids, return_routed_experts=True)
        p = len(s.prompt_tokens)
        assert (
            torch.tensor(s.logprobs) - token_logprobs(full.logits[:, p - 1 : -1], ids[:, p:])[0]
        ).abs().max() <= 1e-5
        assert torch.equal(s.experts.long(), full.routed_experts[0, :-1].long())


def test_resume_after_weight_update_records_old_and_new_policy_tokens():
    """Round 1 under weights A stops at the budget; round 2 resumes under B. Old tokens keep A's
    log-probs and version 0, new tokens get B's log-probs (over the whole context) and version 1;
    the experts are B's routing of prompt+response (the re-prefill under B)."""
    _, _, base = tiny("qwen3_moe")
    a = copy.deepcopy(base)
    b = _perturbed(base, seed=2)
    engine = Engine(copy.deepcopy(a), config=EngineConfig(max_slots=6, max_len=64))
    partial = PartialRollout(engine, Budget(tokens=20))
    sp = SamplingParams(temperature=0.9, max_new_tokens=10, ignore_eos=True, seed=11)
    first = partial.run_round(_requests(sp))
    n_old = {id(s): len(s.response_tokens) for s in first.aborted}
    engine.update_weights(b)
    partial.budget = None
    second = partial.run_round()
    resumed = [s for g in second.groups for s in g if id(s) in n_old]
    assert resumed
    for s in resumed:
        k, p = n_old[id(s)], len(s.prompt_tokens)
        ids = torch.tensor([s.prompt_tokens + s.response_tokens])
        with torch.no_grad():
            lp_a = token_logprobs(a(ids).logits[:, p - 1 : -1], ids[:, p:], temperature=0.9)[0]
            full_b = b(ids, return_routed_experts=True)
        lp_b = token_logprobs(full_b.logits[:, p - 1 : -1], ids[:, p:], temperature=0.9)[0]
        got = torch.tensor(s.logprobs)
        assert s.versions == [0] * k + [1] * (len(s.response_tokens) - k)
        assert (got[:k] - lp_a[:k]).abs().max() <= 1e-5 and (got[k:] - lp_b[k:]).abs().max() <= 1e-5
        assert torch.equal(s.experts.long(), full_b.routed_experts[0, :-1].long())
        assert s.weight_version == 0 and s.aborts == 1 and s.rounds == 2
