"""GPU paths of the trainer (skipped without CUDA). UNTESTED: written in a session with no GPU.

bf16 autocast with fp32 master weights: a GRPO step runs, trains, and its log-probs stay close to
the fp32 ones; weight sync into a bf16 engine copy is one copy_ per tensor on the device.
"""

import copy

import pytest
import torch

from miles_core.data.rollouts import rollouts_table
from miles_core.train import TrainConfig, Trainer, compute_logprobs, samples_from_table
from tests.test_train_support import random_prompts, rows_from, sample, tiny_model

pytestmark = pytest.mark.gpu


def _table(model):
    ids, lp, experts = sample(model, random_prompts(8, 4, seed=0), 4, 6, seed=1)
    rewards = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(2))
    return rollouts_table(rows_from(ids, lp, experts, 4, rewards, 4))


def test_bf16_autocast_step_trains_and_stays_close_to_fp32():
    model = tiny_model(seed=0).cuda()
    table = _table(model.cpu())
    model = model.cuda()
    fp32 = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-3, micro_batch_tokens=512))
    bf16 = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-3, bf16=True, micro_batch_tokens=512))
    samples = samples_from_table(table)
    a = compute_logprobs(fp32.model, fp32.micro_batches(samples))
    b = compute_logprobs(bf16.model, bf16.micro_batches(samples), bf16=True)
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max() < 0.1
    (m,) = bf16.train_rollouts(samples)
    assert m["skipped"] == 0.0 and m["grad_norm"] > 0
    assert next(bf16.model.parameters()).dtype == torch.float32  # fp32 master weights


def test_copy_sync_on_the_device_writes_in_place():
    model = tiny_model(seed=1).cuda()
    trainer = Trainer(model, TrainConfig(lr=1e-2, micro_batch_tokens=512))
    engine = copy.deepcopy(model).to(torch.bfloat16)
    ptrs = [p.data_ptr() for p in engine.parameters()]
    trainer.train_rollouts(samples_from_table(_table(tiny_model(seed=1))))
    report = trainer.sync(engine)
    assert report.mode == "copy" and [p.data_ptr() for p in engine.parameters()] == ptrs
    for (n, p), q in zip(engine.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q.to(torch.bfloat16)), n
