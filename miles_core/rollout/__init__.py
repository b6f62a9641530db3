"""The embedded rollout engine: continuous batching over a slot KV cache on the trainer's model.

    engine = Engine(model, tokenizer, EngineConfig(max_slots=64, max_len=2048))
    samples = engine.generate([Request("p0", ids, SamplingParams(temperature=1.0), n_samples=8)])
    rows = generate_rollouts(engine, tokenizer, prompts, SamplingParams(), n_samples=8, out=url)

Per token it records the log-prob under logits / T (the trainer's quantity), the weight version,
and for MoE models the experts of every position (R3). Partial rollout (`PartialRollout`, a
`Budget` per round) carries unfinished samples across rounds and weight updates.
"""

from miles_core.rollout.engine import Engine, EngineConfig
from miles_core.rollout.generate import build_engine, generate_rollouts, requests_for
from miles_core.rollout.partial import Budget, PartialRollout, RoundResult
from miles_core.rollout.sampling import SamplingParams
from miles_core.rollout.sequence import Request, Sample
from miles_core.rollout.writer import RolloutWriter, sample_row, score_rows

__all__ = [
    "Budget",
    "Engine",
    "EngineConfig",
    "PartialRollout",
    "Request",
    "RolloutWriter",
    "RoundResult",
    "Sample",
    "SamplingParams",
    "build_engine",
    "generate_rollouts",
    "requests_for",
    "sample_row",
    "score_rows",
]
