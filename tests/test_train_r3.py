"""R3 (rollout routing replay): the trainer replays the experts the rollout chose.

Between rollout and training the router weights are perturbed (as a weight update or a different
kernel would do). Without replay the trainer's forward picks other experts for some tokens
(selection mismatch > 0) and its log-probs drift from the rollout's; with replay the selection is
the rollout's exactly (mismatch 0) and the train-vs-rollout KL falls.
"""

import copy

import pyarrow as pa
import torch

from miles_core.data.rollouts import rollouts_table
from miles_core.train import TrainConfig, Trainer, samples_from_table
from tests.test_train_support import random_prompts, rows_from, sample, tiny_model

PROMPT, N, NEW = 6, 4, 8


def _perturbed_setup():
    rollout_model = tiny_model(seed=4)
    prompts = random_prompts(8, PROMPT, seed=5)
    ids, lp, experts = sample(rollout_model, prompts, N, NEW, seed=6)
    rewards = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(7))
    table = rollouts_table(rows_from(ids, lp, experts, PROMPT, rewards, N))
    train_model = copy.deepcopy(rollout_model)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in train_model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return table, train_model


def _first_step(table, model, r3: bool):
    trainer = Trainer(copy.deepcopy(model), TrainConfig(lr=1e-3, r3=r3, micro_batch_tokens=128))
    (m,) = trainer.train_rollouts(samples_from_table(table))
    return m


def test_r3_replay_removes_selection_mismatch_and_lowers_mismatch_kl():
    table, model = _perturbed_setup()
    off = _first_step(table, model, r3=False)
    on = _first_step(table, model, r3=True)
    assert off["routing/mismatch_frac"] > 0.05
    assert on["routing/mismatch_frac"] == 0.0
    assert on["mismatch/k3_kl"] < 0.5 * off["mismatch/k3_kl"]
    assert on["mismatch/abs_diff_mean"] < off["mismatch/abs_diff_mean"]
    print(f"selection mismatch {off['routing/mismatch_frac']:.3f} -> 0; "
          f"k3 KL {off['mismatch/k3_kl']:.2e} -> {on['mismatch/k3_kl']:.2e}")  # fmt: skip


def test_r3_replay_still_trains_the_router():
    table, model = _perturbed_setup()
    trainer = Trainer(model, TrainConfig(lr=1e-2, r3=True, micro_batch_tokens=128))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    trainer.train_rollouts(samples_from_table(table))
    after = dict(model.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before)


def test_without_routed_experts_in_the_parquet_r3_is_a_no_op():
    table, model = _perturbed_setup()
    field = table.schema.field("routed_experts")
    index = table.schema.get_field_index("routed_experts")
    table = table.set_column(index, field, pa.nulls(table.num_rows, field.type))
    m = _first_step(table, model, r3=True)
    assert m["routing/mismatch_frac"] == 0.0 and m["skipped"] == 0.0
