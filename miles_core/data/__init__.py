"""Prompt sources, chat rendering and the rollout Parquet schema.

prompts, report = load_prompts("reasoning_gym:chain_sum?size=100&split=eval")
prompts, report = load_prompts("s3://bucket/math.jsonl", strict=False)
text = render_prompt(prompts[0], tokenizer)
write_rollouts(rows, rollout_part_url("runs/x/rollouts", 3, 0))
table = read_rollouts("runs/x/rollouts/iter_3")
"""

from miles_core.data.chat import encode_prompt, has_chat_template, render_prompt
from miles_core.data.files import read_prompt_file
from miles_core.data.gym import check_disjoint, gym_prompts, split_of
from miles_core.data.prompt import Prompt, content_id
from miles_core.data.report import LoadReport, RowError
from miles_core.data.rollouts import (
    ROLLOUT_SCHEMA,
    STATUSES,
    read_rollouts,
    rollout_part_url,
    rollouts_table,
    validate_rollouts,
    write_rollouts,
)
from miles_core.data.sources import load_prompts, load_sources, parse_spec

__all__ = [
    "ROLLOUT_SCHEMA",
    "STATUSES",
    "LoadReport",
    "Prompt",
    "RowError",
    "check_disjoint",
    "content_id",
    "encode_prompt",
    "gym_prompts",
    "has_chat_template",
    "load_prompts",
    "load_sources",
    "parse_spec",
    "read_prompt_file",
    "read_rollouts",
    "render_prompt",
    "rollout_part_url",
    "rollouts_table",
    "split_of",
    "validate_rollouts",
    "write_rollouts",
]
