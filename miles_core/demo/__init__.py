"""The embedded demo: a tiny Qwen3-MoE base model with a character tokenizer, built on the CPU."""

from miles_core.demo.build import build_demo_base

__all__ = ["build_demo_base"]
