"""The trainer: a model, its optimizer and schedule, and the loop over rollout batches.

`Trainer.train_rollouts(samples)` is one RL iteration's training: advantages per GRPO group, split
into `steps_per_rollout` mini-batches (one optimizer step each, micro-batches accumulated), old and
reference log-probs computed up front when needed, metrics returned per optimizer step as a dict.
`train(...)` is the stage behind `miles train`: load, (resume,) train on a rollout Parquet, save.

QAT: with `qat: int4` the routed experts see fake-quantized INT4 weights in the forward (straight-
through gradient), the numbers the INT4 rollout engine will use; `qat: fp8` also fake-quantizes the
dense linears (`qat_linear_pattern`, default: attention and MLP projections) to FP8 blocks.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from miles_core.rl import length_metrics, reward_metrics
from miles_core.train.advantages import assign_advantages
from miles_core.train.batching import MicroBatch, Sample, make_micro_batches, samples_from_table, split_minibatches
from miles_core.train.checkpoint import (
    is_torch_dist,
    latest_iteration,
    load_checkpoint,
    load_policy,
    read_train_state,
    save_checkpoint,
)
from miles_core.train.config import TrainConfig
from miles_core.train.logprobs import compute_logprobs
from miles_core.train.optim import build_optimizer, build_scheduler
from miles_core.train.sft import sft_step
from miles_core.train.step import grpo_step
from miles_core.train.sync import SyncReport, sync_weights

FP8_LINEARS = (
    r"\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|gate_proj|up_proj|down_proj)$"
)


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, ref_model: nn.Module | None = None):
        self.model, self.cfg = model, cfg
        self.device = next(model.parameters()).device
        torch.manual_seed(cfg.seed)
        self.qat_modules = enable_low_precision(model, cfg)
        self.mtp_only = cfg.mode == "sft" and cfg.mtp_only
        self.optimizer = build_optimizer(model, cfg, mtp_only=self.mtp_only)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.ref_model = None
        if cfg.needs_reference:
            self.ref_model = ref_model if ref_model is not None else _frozen_copy(model)
        self.step = 0  # optimizer steps taken (skipped ones included): the weight version
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)

    # --- data

    def micro_batches(self, samples: list[Sample]) -> list[MicroBatch]:
        cfg = self.model.config
        layers = getattr(self.model, "num_moe_layers", 0)
        k = cfg.num_experts_per_tok if layers else 0
        return [mb.to(self.device) for mb in make_micro_batches(samples, self.cfg.micro_batch_tokens, layers, k)]

    # --- training

    def train_rollouts(self, samples: list[Sample]) -> list[dict[str, float]]:
        """Train on one rollout batch; returns one metrics dict per optimizer step."""
        cfg = self.cfg
        aborted = sum(s.status == "aborted" for s in samples)
        samples = [s for s in samples if s.status != "aborted"]  # unfinished: resumed by the next round
        batch_metrics = _batch_metrics(samples)
        batch_metrics["samples/aborted_dropped"] = float(aborted)
        if cfg.mode == "grpo":
            samples, adv_metrics = assign_advantages(samples, cfg)
            batch_metrics.update(adv_metrics)
        if not samples:
            return [{**batch_metrics, "skipped": 1.0, "step": float(self.step), "empty": 1.0}]
        gen = self.shuffle_gen if cfg.shuffle else None
        minibatches = [self.micro_batches(part) for part in split_minibatches(samples, cfg.steps_per_rollout, gen)]
        newest = max(int(s.token_versions.max()) if s.token_versions is not None and s.token_versions.numel()
                     else s.weight_version for s in samples)  # fmt: skip
        old = self._old_logprobs(minibatches)
        ref = self._ref_logprobs(minibatches)
        out = []
        for i, mbs in enumerate(minibatches):
            if cfg.mode == "sft":
                m = sft_step(self.model, self.optimizer, self.scheduler, mbs, cfg, mtp_only=self.mtp_only)
            else:
                m = grpo_step(self.model, self.optimizer, self.scheduler, mbs, cfg, old_logp=old[i], ref_logp=ref[i],
                              current_version=newest)  # fmt: skip
            self.step += 1
            out.append({**batch_metrics, **m, "step": float(self.step)})
        return out

    def _old_logprobs(self, minibatches) -> list[list[torch.Tensor] | None]:
        """pi_old before any update; None (on-policy: the step's own forward) when one step is taken."""
        cfg = self.cfg
        recompute = cfg.old_logprobs == "recompute" or (cfg.old_logprobs == "auto" and len(minibatches) > 1)
        if cfg.mode != "grpo" or not recompute:
            return [None] * len(minibatches)
        self.model.eval()
        return [self._logprobs(self.model, mbs) for mbs in minibatches]

    def _ref_logprobs(self, minibatches) -> list[list[torch.Tensor] | None]:
        if self.ref_model is None or self.cfg.mode != "grpo":
            return [None] * len(minibatches)
        return [self._logprobs(self.ref_model, mbs) for mbs in minibatches]

    def _logprobs(self, model, mbs):
        cfg = self.cfg
        return compute_logprobs(model, mbs, temperature=cfg.temperature, replay=cfg.r3, bf16=cfg.bf16,
                                chunk_rows=cfg.logprob_chunk_rows)  # fmt: skip

    # --- weights out

    def sync(self, engine) -> SyncReport:
        """Push the current weights into a rollout engine, tagged with the step as weight version."""
        return sync_weights(self.model, engine, self.step)

    def save(self, out_dir: str, extra: dict | None = None) -> str:
        state = {"step": self.step, "shuffle_gen": self.shuffle_gen.get_state(), "config": self.cfg.model_dump()}
        state.update(extra or {})
        return save_checkpoint(out_dir, self.step, self.model, self.optimizer, self.scheduler, state)

    def load(self, ckpt: str, iteration: int | None = None) -> dict:
        extra = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, iteration)
        self.step = int(extra.get("step", self.step))
        if "shuffle_gen" in extra:
            self.shuffle_gen.set_state(extra["shuffle_gen"])
        return extra


def enable_low_precision(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Turn on QAT fake-quant and the bf16 experts cast as configured; returns the modules touched."""
    done = []
    if cfg.qat != "none":
        from miles_core.quant import enable_qat

        pattern = cfg.qat_linear_pattern or (FP8_LINEARS if cfg.qat == "fp8" else None)
        experts = getattr(model, "num_moe_layers", 0) > 0
        done = enable_qat(model, cfg.qat, cfg.qat_group_size, experts=experts, linear_pattern=pattern)
    if cfg.bf16 and next(model.parameters()).is_cuda:
        _bf16_experts(model)
    return done


def _bf16_experts(model: nn.Module) -> None:
    """Under bf16 autocast the expert inputs are bf16 but torch._grouped_mm is no autocast op: cast the
    fp32 master expert weights to bf16 (differentiably) so the grouped GEMM runs. UNTESTED on the GPU."""
    for module in model.modules():
        if hasattr(module, "weight_transform") and hasattr(module, "gate_up_proj"):
            inner = module.weight_transform
            module.weight_transform = (
                (lambda w, f=inner: f(w).to(torch.bfloat16)) if inner else (lambda w: w.to(torch.bfloat16))
            )


def _frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _batch_metrics(samples: list[Sample]) -> dict[str, float]:
    if not samples:
        return {}
    out = reward_metrics(torch.tensor([s.reward for s in samples], dtype=torch.float64))
    lengths = torch.tensor([s.response_len for s in samples])
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]  # [N, Rmax]
    out.update(length_metrics(mask))
    out["samples"] = float(len(samples))
    return out


# --- the stage ----------------------------------------------------------------------------------------


def train(
    ckpt: str,
    rollouts: str,
    out: str,
    cfg: TrainConfig,
    *,
    device: str | None = None,
    ref_ckpt: str | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> list[dict[str, float]]:
    """Load `ckpt` (HF or torch_dist; a trainer checkpoint resumes its optimizer and step), train on
    every rollout iteration under `rollouts` in order, save a torch_dist checkpoint into `out`.
    Metrics (one dict per optimizer step) are appended to `out/train_metrics.jsonl` and returned."""
    from miles_core.data.rollouts import read_rollouts

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_policy(ckpt, device=dev)
    state = read_train_state(ckpt) if is_torch_dist(ckpt) else {}
    resume = bool(state.get("optimizer"))
    # The KL reference is the policy the run started from, not the checkpoint it resumes from:
    # its path and iteration travel in every checkpoint the run writes.
    extra = state.get("extra", {})
    if ref_ckpt is None and "ref_ckpt" in extra:
        ref_ckpt, ref_iter = extra["ref_ckpt"], extra.get("ref_iteration")
    else:
        ref_ckpt = os.path.abspath(ref_ckpt or ckpt)
        ref_iter = latest_iteration(ref_ckpt) if is_torch_dist(ref_ckpt) else None
    ref = None
    if cfg.needs_reference and (resume or ref_ckpt != os.path.abspath(ckpt)):
        ref = load_policy(ref_ckpt, device=dev, iteration=ref_iter)
    trainer = Trainer(model, cfg, ref_model=ref)
    if resume:
        trainer.load(ckpt)  # a trainer checkpoint: resume optimizer, schedule, step and RNG
    table = read_rollouts(rollouts)
    samples = samples_from_table(table)
    iterations = sorted({s.iteration for s in samples})
    metrics: list[dict[str, float]] = []
    for n, it in enumerate(iterations):
        t0 = time.perf_counter()
        for m in trainer.train_rollouts([s for s in samples if s.iteration == it]):
            m["rollout_iteration"] = float(it)
            m["wall_seconds"] = time.perf_counter() - t0
            metrics.append(m)
        if progress is not None:
            progress(n + 1, len(iterations), metrics[-1])
    trainer.save(out, extra={"ref_ckpt": ref_ckpt, "ref_iteration": ref_iter})
    if os.path.isdir(ckpt):  # the tokenizer and chat template travel with every checkpoint
        from miles_core.checkpoint.folders import copy_side_files

        copy_side_files(ckpt, out, missing_only=True)
    with open(os.path.join(out, "train_metrics.jsonl"), "a") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")
    return metrics
