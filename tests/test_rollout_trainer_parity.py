"""The engine and the trainer compute the same numbers: rows written by the engine, read back
through the trainer's batching and policy forward (right-padded, attention-masked micro-batches),
give log-probs equal to the recorded ones (max abs diff <= 1e-5) and, without replay, choose the
recorded experts: the train-rollout mismatch at step 0 is rounding only."""

import pytest
import torch

from miles_core.data import read_rollouts
from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams, sample_row
from miles_core.rollout.writer import RolloutWriter
from miles_core.train.batching import collate, samples_from_table
from miles_core.train.logprobs import policy_forward
from tests.test_rollout_fixtures import one_thread, ragged_prompts, tiny  # noqa: F401


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "llama"])
def test_trainer_logprobs_and_routing_equal_the_engine_record(arch, tmp_path):
    _, _, model = tiny(arch)
    sp = SamplingParams(temperature=0.7, top_k=30, max_new_tokens=10, seed=4)
    reqs = [Request(f"p{i}", p, sp, n_samples=2) for i, p in enumerate(ragged_prompts((4, 12, 7), seed=14))]
    samples = Engine(model, config=EngineConfig(max_slots=4, max_len=64)).generate(reqs)
    RolloutWriter(str(tmp_path), 1).write([sample_row(s, 1) for s in samples])
    rows = samples_from_table(read_rollouts(str(tmp_path / "iter_1")))
    mb = collate(rows, list(range(len(rows))), model.num_moe_layers, model.config.num_experts_per_tok)
    with torch.no_grad():
        out = policy_forward(model, mb, temperature=0.7, replay=False)
    m = mb.loss_mask
    assert int(m.sum()) == sum(len(s.response_tokens) for s in samples)
    assert (out.logp[m] - mb.rollout_logprobs[m]).abs().max().item() <= 1e-5
    if model.num_moe_layers:
        real = mb.attention_mask
        assert torch.equal(out.routed_experts[real].long(), mb.routed_experts[real].long())
