"""TrainConfig: every knob of the trainer, typed and validated (pydantic v2), with defaults that run.

One flat model on purpose: the same object is the YAML section, the CLI's options and the Prefect
form, and every field is used by exactly one of optim.py, step.py, batching.py, logprobs.py, sft.py
or trainer.py. Functions take the config (or the few fields they use), never an argparse namespace.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from miles_core.errors import MilesError

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
ISLevel = Literal["token", "sequence", "geometric"]


class TrainConfig(BaseModel):
    """GRPO / SFT trainer settings. See miles_core/rl for the math behind each switch."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Literal["grpo", "sft"] = "grpo"

    # --- optimizer (optim.py)
    lr: float = Field(1e-6, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["constant", "cosine", "linear"] = "constant"
    decay_steps: int | None = Field(None, gt=0, description="steps from the end of warm-up to min_lr")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.98, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0, description="max global grad norm; 0 = no clipping")
    freeze_router: bool = False

    # --- policy loss (step.py)
    eps_clip: float = Field(0.2, gt=0, description="PPO clip, lower side")
    eps_clip_high: float | None = Field(0.28, gt=0, description="upper side (clip-higher); None = eps_clip")
    dual_clip: float | None = Field(None, gt=1, description="dual-clip constant c > 1, or None")
    ratio_level: Literal["token", "sequence"] = "token"
    loss_agg: AggMode = "token-mean"
    loss_agg_norm: float | None = Field(None, gt=0, description="Dr.GRPO's constant; None = longest response")

    # --- advantages
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    whiten_advantages: bool = False
    drop_degenerate_groups: bool = False

    # --- KL to a frozen reference, entropy bonus
    kl_coef: float = Field(0.0, ge=0, description="0 = no reference model is loaded")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = Field(0.0, ge=0)

    # --- train-inference alignment
    temperature: float = Field(1.0, gt=0, description="the rollout's sampling temperature")
    old_logprobs: Literal["auto", "recompute", "rollout"] = "auto"
    tis: bool = False
    tis_cap: float = Field(2.0, gt=0)
    tis_level: ISLevel = "token"
    mis: bool = False
    mis_low: float = Field(0.5, ge=0)
    mis_high: float = Field(2.0, gt=0)
    mis_level: ISLevel = "token"
    stale_tokens: Literal["keep", "mask", "tis"] = "keep"
    r3: bool = Field(True, description="replay the rollout's routed experts when the Parquet has them")

    # --- low precision
    qat: Literal["none", "int4", "fp8"] = "none"
    qat_group_size: int = Field(128, gt=0)
    qat_linear_pattern: str | None = Field(None, description="regex of nn.Linear names to fake-quantize too")
    bf16: bool = Field(False, description="bf16 autocast with fp32 master weights (CUDA only)")

    # --- online MTP
    mtp_loss_scale: float = Field(0.0, ge=0, description="0 = MTP layers are not trained")
    mtp_detach_trunk: bool = True
    mtp_only: bool = Field(False, description="SFT mode: train only the MTP (draft) layers, trunk frozen")

    # --- batching
    micro_batch_tokens: int = Field(8192, gt=0, description="token budget per micro-batch, padding included")
    steps_per_rollout: int = Field(1, ge=1, description="optimizer steps per rollout batch (mini-batches)")
    shuffle: bool = False
    logprob_chunk_rows: int | None = Field(None, gt=0, description="rows per log_softmax chunk (no-grad passes)")

    seed: int = 0
    nan_guard: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.mis and self.mis_low >= self.mis_high:
            raise ValueError(f"mis_low ({self.mis_low}) must be below mis_high ({self.mis_high})")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.mode == "grpo" and self.kl_coef > 0

    @classmethod
    def load(cls, source: str | dict | None = None, **overrides) -> TrainConfig:
        """From a YAML file (its top level or its `train:` section), a dict, or nothing; then overrides."""
        data: dict = {}
        if isinstance(source, dict):
            data = dict(source)
        elif source is not None:
            data = _read_yaml(source)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValueError as e:
            raise MilesError(f"invalid train config: {_one_line(e)}") from None


def _read_yaml(url: str) -> dict:
    import yaml

    from miles_core.io import filesystem

    fs, path = filesystem(url)
    if not fs.exists(path):
        raise MilesError(f"train config {url} does not exist")
    with fs.open(path, "r") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise MilesError(f"train config {url} must be a YAML mapping")
    return dict(data.get("train", data))


def _one_line(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        parts = [f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}" for err in errors()]
        return "; ".join(parts)
    return str(e).replace("\n", " ")
