"""Step 0: when the rollout's log-probs are the trainer's own, everything off-policy is exactly neutral.

The rollout log-probs are computed by the same forward the trainer runs (same model, same
micro-batches), stored through a real Parquet file (float32 round trip) and read back by the
trainer. Then: ratio exactly 1, mismatch exactly 0, KL to a reference equal to the policy exactly 0,
TIS weights exactly 1 and MIS keeps everything, also on a DeepSeek-V3 (MLA, shared experts) model.
"""

import pytest
import torch

from miles_core.data.rollouts import read_rollouts, write_rollouts
from miles_core.train import TrainConfig, Trainer, compute_logprobs, samples_from_table
from tests.test_train_support import random_prompts, rows_from, sample, tiny_model

PROMPT, N, NEW = 5, 4, 6


def _rollouts_with_trainer_logprobs(model, trainer, tmp_path, temperature):
    prompts = random_prompts(6, PROMPT, seed=1)
    ids, _, experts = sample(model, prompts, N, NEW, temperature, seed=2)
    rewards = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(3))
    rows = rows_from(ids, torch.zeros(ids.shape[0], NEW), experts, PROMPT, rewards, N)
    samples = samples_from_table(_roundtrip(rows, tmp_path / "draft.parquet"))
    mbs = trainer.micro_batches(samples)
    lps = compute_logprobs(model, mbs, temperature=temperature)  # the trainer's own forward
    for mb, lp in zip(mbs, lps, strict=True):
        for row, idx in enumerate(mb.index.tolist()):
            rows[idx]["rollout_logprobs"] = lp[row][mb.loss_mask[row]]
    return samples_from_table(_roundtrip(rows, tmp_path / "part-0.parquet"))


def _roundtrip(rows, path):
    write_rollouts(rows, str(path))
    return read_rollouts(str(path))


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3"])
def test_step0_with_trainer_logprobs_has_ratio_one_zero_mismatch_zero_kl(kind, tmp_path):
    model = tiny_model(kind, seed=0)
    cfg = TrainConfig(lr=1e-3, kl_coef=0.1, tis=True, mis=True, temperature=0.8, dual_clip=3.0,
                      micro_batch_tokens=64)  # fmt: skip
    trainer = Trainer(model, cfg)  # reference = a frozen copy of the policy at step 0
    samples = _rollouts_with_trainer_logprobs(model, trainer, tmp_path, cfg.temperature)
    (m,) = trainer.train_rollouts(samples)
    assert m["tokens"] == 6 * N * NEW
    assert m["policy/ratio_mean"] == 1.0 and m["policy/ratio_max_dev"] == 0.0
    assert m["policy/clip_frac"] == 0.0 and m["policy/approx_kl"] == 0.0
    assert m["mismatch/abs_diff_max"] == 0.0 and m["mismatch/k3_kl"] == 0.0
    assert m["mismatch/ratio_outside_frac"] == 0.0
    assert m["kl"] == 0.0 and m["kl_loss"] == 0.0
    assert m["off_policy/tis_weight_mean"] == 1.0 and m["off_policy/tis_weight_max"] == 1.0
    assert m["off_policy/mis_keep_frac"] == 1.0
    assert m["routing/mismatch_frac"] == 0.0
    assert m["skipped"] == 0.0 and m["grad_norm"] > 0


def test_step0_with_recomputed_old_logprobs_is_also_exact(tmp_path):
    """steps_per_rollout=2 recomputes pi_old in a no-grad pass up front: it equals the rollout's exactly."""
    model = tiny_model(seed=1)
    cfg = TrainConfig(lr=1e-3, steps_per_rollout=2, micro_batch_tokens=64)
    trainer = Trainer(model, cfg)
    samples = _rollouts_with_trainer_logprobs(model, trainer, tmp_path, 1.0)
    first, second = trainer.train_rollouts(samples)
    assert first["policy/ratio_max_dev"] == 0.0 and first["mismatch/abs_diff_max"] == 0.0
    # pi_old of mini-batch 2 was taken before any update: it still equals the rollout's exactly,
    # while the policy itself has moved (ratio != 1, the PPO trust region is doing its job).
    assert second["mismatch/abs_diff_max"] == 0.0
    assert second["policy/ratio_max_dev"] > 0.0
    assert second["step"] == 2.0
