"""The trainer: GRPO (PPO-clip, TIS/MIS, R3 replay, KL, entropy), SFT, QAT, online MTP, checkpoints, weight sync.

    cfg = TrainConfig(lr=1e-5, kl_coef=0.0, r3=True)
    trainer = Trainer(load_policy(ckpt), cfg)
    metrics = trainer.train_rollouts(samples_from_table(read_rollouts(url)))   # one dict per step
    trainer.sync(engine)                                                       # weights -> rollout
    trainer.save(out_dir)                                                      # torch_dist + optimizer

`train(ckpt, rollouts, out, cfg)` is the `miles train` stage. The math lives in miles_core.rl.
"""

from miles_core.train.advantages import assign_advantages
from miles_core.train.batching import (
    MicroBatch,
    Sample,
    make_micro_batches,
    samples_from_table,
    samples_from_tokens,
    split_minibatches,
)
from miles_core.train.checkpoint import is_torch_dist, load_checkpoint, load_policy, save_checkpoint
from miles_core.train.config import TrainConfig
from miles_core.train.logprobs import PolicyOut, compute_logprobs, policy_forward, routing_mismatch
from miles_core.train.optim import build_optimizer, build_scheduler, lr_at
from miles_core.train.sft import sft_loss, sft_step
from miles_core.train.step import apply_update, grpo_step
from miles_core.train.sync import SyncReport, sync_weights
from miles_core.train.trainer import Trainer, enable_low_precision, train

__all__ = [
    "MicroBatch",
    "PolicyOut",
    "Sample",
    "SyncReport",
    "TrainConfig",
    "Trainer",
    "apply_update",
    "assign_advantages",
    "build_optimizer",
    "build_scheduler",
    "compute_logprobs",
    "enable_low_precision",
    "grpo_step",
    "is_torch_dist",
    "load_checkpoint",
    "load_policy",
    "lr_at",
    "make_micro_batches",
    "policy_forward",
    "routing_mismatch",
    "samples_from_table",
    "samples_from_tokens",
    "save_checkpoint",
    "sft_loss",
    "sft_step",
    "split_minibatches",
    "sync_weights",
    "train",
]
