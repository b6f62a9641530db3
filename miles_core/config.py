"""Typed, validated configuration of a pipeline run (pydantic v2), one model per component.

The same models are the YAML files in configs/, the `miles pipeline` options and the Prefect
flow parameters (so the UI shows a form). Every field has a default that runs; `configs/demo.yaml`
is the embedded default. `load_pipeline_config` turns any validation error into one `MilesError`
line naming the field, before any stage runs.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from miles_core.errors import MilesError
from miles_core.train.config import TrainConfig

_STRICT = ConfigDict(extra="forbid")


class DemoModelConfig(BaseModel):
    """The embedded demo's base model: a tiny Qwen3-MoE, char tokenizer, SFT warm-up (see miles_core.demo)."""

    model_config = _STRICT
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_experts: int = Field(4, gt=1)
    top_k: int = Field(2, gt=0)
    expert_hidden: int = Field(256, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    warmup_source: str = Field(
        "reasoning_gym:chain_sum?size=3000&seed=101&split=train&min_terms=2&max_terms=2&min_digits=2&max_digits=2",
        description="prompts the SFT warm-up learns from",
    )
    val_source: str = Field(
        "reasoning_gym:chain_sum?size=128&seed=202&split=train&min_terms=2&max_terms=2&min_digits=2&max_digits=2",
        description="held-out prompts whose greedy accuracy stops the warm-up",
    )
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-3, gt=0)
    max_steps: int = Field(600, gt=0)
    target_accuracy: float = Field(0.3, gt=0, le=1)
    eval_every: int = Field(25, gt=0)
    seed: int = 0


class ModelSource(BaseModel):
    model_config = _STRICT
    hf_path: str | None = Field(None, description="HF checkpoint folder to start from; empty = build the demo model")
    demo: DemoModelConfig = DemoModelConfig()
    mtp_num_layers: int = Field(0, ge=0, description="MTP layers to create at conversion (0 = keep what HF has)")


class DataConfig(BaseModel):
    model_config = _STRICT
    train_source: str = Field(
        "reasoning_gym:chain_sum?size=4096&seed=7&split=train&min_terms=2&max_terms=2&min_digits=2&max_digits=2",
        description="RL prompts (source spec: a JSONL/Parquet URL or reasoning_gym:NAME?size=..&seed=..)",
    )
    exclude_sources: list[str] = Field(
        default_factory=lambda: [DemoModelConfig().warmup_source, DemoModelConfig().val_source],
        description="prompts of these sources are removed from train_source (e.g. what the warm-up saw)",
    )
    prompts_per_iteration: int = Field(256, gt=0)
    reward: str = Field("auto", description="'auto', 'math', 'reasoning_gym' or a dotted path pkg.mod:fn")
    seed: int = 0


class SamplingConfig(BaseModel):
    model_config = _STRICT
    n_samples: int = Field(8, gt=0, description="samples per prompt (the GRPO group)")
    max_new_tokens: int = Field(8, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    max_slots: int = Field(256, gt=0, description="samples the engine decodes together")
    partial_budget_tokens: int | None = Field(
        None, gt=0, description="partial rollout: tokens per round; unfinished samples resume next iteration"
    )


class QuantConfig(BaseModel):
    model_config = _STRICT
    format: Literal["none", "fp8", "int4"] = "int4"
    group_size: int = Field(128, gt=0)


class EvalConfig(BaseModel):
    model_config = _STRICT
    source: str = Field(
        "reasoning_gym:chain_sum?size=200&seed=11&split=eval&min_terms=2&max_terms=2&min_digits=2&max_digits=2"
    )
    every: int = Field(0, ge=0, description="evaluate every k iterations (0 = only before and after)")
    n_samples: int = Field(32, gt=0)
    k: list[int] = Field(default_factory=lambda: [1, 4, 8])
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    reward: str = Field("auto", description="'auto', 'math', 'reasoning_gym' or pkg.mod:fn")
    max_slots: int = Field(256, gt=0)

    @field_validator("k")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("k must be a non-empty list of positive integers")
        return sorted(set(v))


class PipelineConfig(BaseModel):
    """One RL run: convert -> quantize -> N x [rollout -> train -> sync] (+ eval) -> export."""

    model_config = _STRICT
    run_name: str = Field("demo", description="runs with the same name resume each other")
    artifact_root: str = Field("artifacts", description="fsspec URL under which runs/{run_name}/ is written")
    iterations: int = Field(12, ge=0)
    seed: int = 0
    model: ModelSource = ModelSource()
    data: DataConfig = DataConfig()
    rollout: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig(lr=1e-4, steps_per_rollout=4, qat="int4", r3=True, temperature=1.0)
    quant: QuantConfig = QuantConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("run_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("run_name may hold letters, digits, '.', '_' and '-' only")
        return v


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one `a.b.c=value` override to a nested dict (the value parsed as YAML)."""
    import yaml

    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise MilesError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(value) if isinstance(value, str) else value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `top` onto `base`: a YAML that sets train.lr keeps the pipeline's other train defaults."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_pipeline_config(source: str | dict | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """From a YAML URL or dict (or the defaults), then `key.path=value` overrides; one-line errors."""
    import yaml

    from miles_core.io import filesystem

    data: dict[str, Any] = {}
    if isinstance(source, dict):
        data = dict(source)
    elif source is not None:
        fs, path = filesystem(source)
        if not fs.exists(path):
            raise MilesError(f"config {source} does not exist")
        with fs.open(path, "r") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise MilesError(f"config {source} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise MilesError(f"config {source} must be a YAML mapping")
    data = _merge(PipelineConfig().model_dump(), data)
    for item in overrides or []:
        if "=" not in item:
            raise MilesError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        set_path(data, key.strip(), value)
    try:
        return PipelineConfig(**data)
    except ValidationError as e:
        raise MilesError(f"invalid config: {_one_line(e)}") from None
