"""The engine against references: transformers' greedy `generate`, and one full forward of the
model over prompt+response for the recorded log-probs and routed experts."""

import pytest
import torch

from miles_core.rl.logits import token_logprobs
from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams
from tests.test_rollout_fixtures import one_thread, ragged_prompts, tiny  # noqa: F401
from tests.tiny_models import CONFIGS

LENGTHS = (5, 11, 3, 8, 14)


def _hf_greedy(hf, prompt, n):
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=0, eos_token_id=hf.config.eos_token_id)
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_greedy_equals_transformers_generate_across_batch_sizes(arch):
    _, hf, model = tiny(arch)
    prompts = ragged_prompts(LENGTHS, seed=1)
    n = 12
    ref = [_hf_greedy(hf, p, n) for p in prompts]
    sp = SamplingParams(temperature=0.0, max_new_tokens=n)
    for slots in (1, 2, 5):
        engine = Engine(model, config=EngineConfig(max_slots=slots, max_len=64))
        out = engine.generate([Request(f"p{i}", p, sp) for i, p in enumerate(prompts)])
        got = [s.response_tokens for s in out]
        assert got == ref, f"{arch} max_slots={slots}"
        for s in out:
            assert s.status == ("completed" if s.finish_reason == "stop_token" else "truncated")


def test_greedy_equals_transformers_batched_left_padded_generate():
    from transformers import GenerationConfig

    _, hf, model = tiny("qwen3_moe")
    prompts = ragged_prompts(LENGTHS, seed=2)
    t = max(LENGTHS)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :], mask[i, t - len(p) :] = torch.tensor(p), 1
    gc = GenerationConfig(do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, generation_config=gc)[:, t:].tolist()
    sp = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    out = Engine(model, config=EngineConfig(max_slots=8, max_len=64)).generate(
        [Request(f"p{i}", p, sp) for i, p in enumerate(prompts)]
    )
    assert [s.response_tokens for s in out] == ref


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_recorded_logprobs_and_experts_equal_one_full_forward(arch):
    """Sampled (T=0.8, top-p 0.9, groups of 3 sharing a prefill, 2 slots so groups split): every
    recorded log-prob equals log_softmax(logits / T) of a full forward, max abs diff <= 1e-5, and
    the experts of every position of prompt+response but the last equal the full forward's."""
    _, _, model = tiny(arch)
    prompts = ragged_prompts((6, 13, 4), seed=3)
    sp = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=9, ignore_eos=True, seed=7)
    engine = Engine(model, config=EngineConfig(max_slots=2, max_len=64))
    samples = engine.generate([Request(f"p{i}", p, sp, n_samples=3) for i, p in enumerate(prompts)])
    assert len({tuple(s.response_tokens) for s in samples[:3]}) > 1  # group members differ
    worst = 0.0
    for s in samples:
        ids = torch.tensor([s.prompt_tokens + s.response_tokens])
        with torch.no_grad():
            full = model(ids, return_routed_experts=model.num_moe_layers > 0)
        p = len(s.prompt_tokens)
        ref = token_logprobs(full.logits[:, p - 1 : -1], ids[:, p:], temperature=0.8)[0]
        worst = max(worst, (torch.tensor(s.logprobs) - ref).abs().max().item())
        if model.num_moe_layers:
            assert s.experts.dtype == torch.int16
            assert s.experts.shape == (ids.shape[1] - 1, model.num_moe_layers, model.config.num_experts_per_tok)
            assert torch.equal(s.experts.long(), full.routed_experts[0, :-1].long())
        else:
            assert s.experts is None
    assert worst <= 1e-5, f"{arch}: max abs log-prob diff {worst:.2e}"


def test_stop_token_ids_and_max_len_stop_generation():
    _, _, model = tiny("qwen3")
    prompt = ragged_prompts((6,), seed=4)[0]
    free = Engine(model, config=EngineConfig(max_slots=2, max_len=64)).generate(
        [Request("a", prompt, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))]
    )[0]
    stop_tok = free.response_tokens[4]
    first = free.response_tokens.index(stop_tok)
    engine = Engine(model, config=EngineConfig(max_slots=2, max_len=10))
    sp_stop = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, stop_token_ids=[stop_tok])
    sp_len = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    stopped, capped = engine.generate([Request("a", prompt, sp_stop), Request("b", prompt, sp_len)])
    assert stopped.response_tokens == free.response_tokens[: first + 1]
    assert (stopped.status, stopped.finish_reason) == ("completed", "stop_token")
    assert capped.response_tokens == free.response_tokens[:4]  # 6 prompt + 4 = max_len 10
    assert (capped.status, capped.finish_reason) == ("truncated", "max_len")


def test_engine_recovers_after_an_error_mid_run_and_rejects_bad_prompts():
    from miles_core.errors import MilesError

    _, _, model = tiny("qwen3")
    engine = Engine(model, config=EngineConfig(max_slots=3, max_len=32))
    reqs = [Request(f"p{i}", p, SamplingParams(temperature=0.0, max_new_tokens=6)) for i, p in
            enumerate(ragged_prompts((4, 7), seed=12))]  # fmt: skip

    def boom(n_tokens, finished):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        engine.generate(reqs, on_step=boom)
    assert len(engine.scheduler.free) == 3 and engine.scheduler.idle
    again = engine.generate(reqs)
    assert [s.response_tokens for s in again] == [s.response_tokens for s in Engine(model).generate(reqs)]
    with pytest.raises(MilesError, match="max_len"):
        engine.generate([Request("long", list(range(3, 40)), SamplingParams())])
    with pytest.raises(MilesError, match="empty"):
        engine.generate([Request("empty", [], SamplingParams())])


def test_group_shares_one_prefill_and_splits_when_slots_run_short(monkeypatch):
    import miles_core.rollout.engine as engine_mod
    from miles_core.rollout.scheduler import Scheduler

    _, _, model = tiny("qwen3_moe")
    prompts = ragged_prompts((6, 9), seed=13)
    prefilled = []
    real = engine_mod.forward_step

    def counting(model_, cache, batch, **kw):
        if batch.tokens.shape[1] > 1 or bool((batch.start == 0).all()):
            prefilled.append(int(batch.n_valid.sum()))
        return real(model_, cache, batch, **kw)

    monkeypatch.setattr(engine_mod, "forward_step", counting)
    sp = SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True, seed=1)
    Engine(model, config=EngineConfig(max_slots=8, max_len=32)).generate([Request(f"p{i}", p, sp, 4) for i, p in
                                                                          enumerate(prompts)])  # fmt: skip
    assert sum(prefilled) == 6 + 9  # each prompt once, not once per sample

    sched = Scheduler(slots=4, max_prefill_tokens=10_000)
    samples = Engine(model, config=EngineConfig(max_slots=4)).samples_for(
        [Request(f"p{i}", p, sp, 3) for i, p in enumerate(prompts)]
    )
    sched.enqueue(samples)
    first = sched.admit()
    assert [len(u.samples) for u in first] == [3, 1]  # p1's group is split: one member now
    assert [len(u.samples) for u in sched.waiting] == [2] and sched.waiting[0].tokens == prompts[1]
