"""Weight sync into the rollout engine: after a step the engine's next rollout uses the new weights.

Shared (the engine runs the trainer's module): zero bytes moved, every engine parameter is the
trainer's storage (data_ptr), and the version and the recorded log-probs show the new weights.
Copy (the engine has its own copy): one in-place copy_, the engine's storage is not reallocated.
Requant (an INT4 / FP8 engine): the trainer's weights are re-quantized into the engine's buffers,
equal to a fresh quantization; with INT4 QAT the engine's logits match the trainer's fake-quant ones.
"""

import copy

import pytest
import torch

from miles_core.data.rollouts import rollouts_table
from miles_core.quant import QuantExperts, quantize_model_
from miles_core.rollout import Engine, EngineConfig
from miles_core.train import TrainConfig, Trainer, compute_logprobs, samples_from_table
from tests.test_train_support import engine_rollout, low_token_reward, random_prompts, tiny_model

N, NEW = 4, 5


def _rollout(engine, it):
    rows = engine_rollout(engine, random_prompts(6, 4, seed=it), N, NEW, low_token_reward, it, seed=it)
    return samples_from_table(rollouts_table(rows))


def _trainer_logprobs(model, trainer, samples):
    mbs = trainer.micro_batches(samples)
    lps = compute_logprobs(model, mbs)
    return torch.cat([lp[mb.loss_mask] for mb, lp in zip(mbs, lps, strict=True)]), mbs


def _rollout_logprobs(mbs):
    return torch.cat([mb.rollout_logprobs[mb.loss_mask] for mb in mbs])


def test_shared_sync_moves_nothing_and_the_next_rollout_uses_the_new_weights():
    model = tiny_model(seed=11)
    trainer = Trainer(model, TrainConfig(lr=5e-2, micro_batch_tokens=512))
    engine = Engine(model, None, EngineConfig(max_slots=32, max_len=16))
    before = copy.deepcopy(model)
    trainer.train_rollouts(_rollout(engine, 0))
    report = trainer.sync(engine)
    assert report.mode == "shared" and report.source_bytes == 0 and report.tensors == 0
    assert engine.version == trainer.step == 1
    trainer_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert all(p.data_ptr() == trainer_ptrs[n] for n, p in engine.model.named_parameters())  # no second copy

    samples = _rollout(engine, 1)
    assert {s.weight_version for s in samples} == {1}
    new_lp, mbs = _trainer_logprobs(model, trainer, samples)
    old_lp, _ = _trainer_logprobs(before, trainer, samples)
    recorded = _rollout_logprobs(mbs)
    assert (recorded - new_lp).abs().max() < 1e-4  # the engine sampled with the new weights...
    assert (recorded - old_lp).abs().max() > 1e-2  # ...not the old ones


def test_copy_sync_writes_in_place_and_matches_the_trainer():
    model = tiny_model(seed=12)
    trainer = Trainer(model, TrainConfig(lr=5e-2, micro_batch_tokens=512))
    engine = Engine(copy.deepcopy(model), None, EngineConfig(max_slots=32, max_len=16))
    ptrs = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    trainer.train_rollouts(_rollout(engine, 0))
    report = trainer.sync(engine)
    assert report.mode == "copy" and report.source_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert report.seconds > 0 and engine.version == 1
    for n, p in engine.model.named_parameters():
        assert p.data_ptr() == ptrs[n]  # same storage: no reallocation
        assert torch.equal(p, dict(model.named_parameters())[n])
    samples = _rollout(engine, 1)
    new_lp, mbs = _trainer_logprobs(model, trainer, samples)
    assert (_rollout_logprobs(mbs) - new_lp).abs().max() < 1e-4


def test_int4_engine_gets_requantized_weights_equal_to_the_trainers_qat_forward():
    model = tiny_model(seed=13)
    trainer = Trainer(model, TrainConfig(lr=5e-2, qat="int4", qat_group_size=32, micro_batch_tokens=512))
    engine = Engine(_quantized(model, "int4", 32), None, EngineConfig(max_slots=32, max_len=16))
    trainer.train_rollouts(_rollout(engine, 0))
    report = trainer.sync(engine)
    assert report.mode == "requant" and engine.version == 1
    fresh = _quantized(model, "int4", 32)
    for (n, a), (_, b) in zip(engine.model.named_buffers(), fresh.named_buffers(), strict=True):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qat_logits, engine_logits = model(ids).logits, engine.model(ids).logits
    torch.testing.assert_close(engine_logits, qat_logits, rtol=1e-5, atol=1e-5)


def test_fp8_engine_gets_requantized_weights():
    model = tiny_model(seed=14, moe_intermediate_size=128)  # FP8 expert blocks need 128-row multiples
    trainer = Trainer(model, TrainConfig(lr=5e-2, micro_batch_tokens=512))
    engine = Engine(_quantized(model, "fp8"), None, EngineConfig(max_slots=32, max_len=16))
    trainer.train_rollouts(_rollout(engine, 0))
    report = trainer.sync(engine)
    assert report.mode == "requant"
    fresh = _quantized(model, "fp8")
    for (n, a), (_, b) in zip(engine.model.named_buffers(), fresh.named_buffers(), strict=True):
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                           b.view(torch.uint8) if b.dtype.itemsize == 1 else b), n  # fmt: skip


def _quantized(model, fmt, group_size=128):
    q = copy.deepcopy(model)
    quantize_model_(q, fmt, group_size=group_size)
    assert any(isinstance(m, QuantExperts) for m in q.modules())
    return q


@pytest.mark.parametrize("bad", ["not an engine"])
def test_sync_into_something_without_a_model_is_a_type_error(bad):
    trainer = Trainer(tiny_model(seed=15), TrainConfig())
    with pytest.raises(TypeError):
        trainer.sync(bad)
