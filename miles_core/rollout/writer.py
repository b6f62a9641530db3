"""Samples -> rollout rows (DESIGN.md's Parquet contract), rewards, and atomic part files.

Every row carries the contract's columns plus:
- `logprob_versions` list<int32>: the weight version that produced each response token. With
  partial rollout a sample may span versions; `weight_version` is then the *oldest* of them, so a
  per-sample staleness check is conservative and a per-token one can mask exactly.
- `finish_reason` string: stop_token | stop_string | max_new_tokens | max_len | budget.
- metadata: the prompt's source and answer, the log-prob temperature (the trainer must divide by
  the same T), the rounds the sample spanned and how often a budget interrupted it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from miles_core.data.rollouts import rollout_part_url, write_rollouts
from miles_core.errors import MilesError
from miles_core.io import filesystem, join
from miles_core.rollout.sampling import logprob_temperature
from miles_core.rollout.sequence import Sample

__all__ = ["RolloutWriter", "sample_row", "score_rows"]


def sample_row(s: Sample, iteration: int) -> dict[str, Any]:
    """One rollout row (reward 0 until `score_rows`)."""
    r = s.request
    meta: dict[str, Any] = dict(r.metadata)
    if r.prompt is not None:
        meta.update(source=r.prompt.source, answer=r.prompt.answer)
    meta.update(
        temperature=logprob_temperature(r.sampling),
        sampling_temperature=r.sampling.temperature,
        rounds=s.rounds,
        aborts=s.aborts,
        weight_version_last=max(s.versions) if s.versions else 0,
    )
    return {
        "prompt_id": r.prompt_id,
        "sample_index": s.sample_index,
        "iteration": iteration,
        "prompt_tokens": np.asarray(r.prompt_tokens, dtype=np.int32),
        "response_tokens": np.asarray(s.response_tokens, dtype=np.int32),
        "response": s.text or "",
        "rollout_logprobs": np.asarray(s.logprobs, dtype=np.float32),
        "routed_experts": None if s.experts is None else s.experts.numpy(),
        "reward": 0.0,
        "status": s.status,
        "weight_version": s.weight_version,
        "metadata": json.dumps(meta, default=str),
        "logprob_versions": np.asarray(s.versions, dtype=np.int32),
        "finish_reason": s.finish_reason or "",
    }


def score_rows(rows: list[dict[str, Any]], samples: list[Sample], reward: Any = "auto") -> list[dict[str, Any]]:
    """Rewards from `miles_core.rewards` for rows whose requests came from a `Prompt`; aborted rows get 0.
    Failures are counted in metadata (`reward_status`, `reward_error`), never raised."""
    from miles_core.rewards import annotate_rows, score_samples

    idx = [i for i, s in enumerate(samples) if s.request.prompt is not None and s.finished]
    if reward is None or not idx:
        return rows
    result = score_samples([samples[i].request.prompt for i in idx], [rows[i]["response"] for i in idx], reward)
    scored = annotate_rows([rows[i] for i in idx], result)
    out = list(rows)
    for i, row in zip(idx, scored, strict=True):
        out[i] = {**row, "metadata": json.dumps(row["metadata"], default=str)}  # a JSON string, as in the Parquet
    return out


class RolloutWriter:
    """Writes rows of one iteration as `root/iter_N/part-K.parquet`, K counting up from `first_part`.

    `overwrite`: None = write next to whatever is there; False = refuse an `iter_N/` that already
    holds parts (a reader would mix the two runs); True = delete those parts first.
    """

    def __init__(self, root: str, iteration: int, first_part: int = 0, overwrite: bool | None = None):
        self.root, self.iteration, self.next_part = root, iteration, first_part
        self.urls: list[str] = []
        if overwrite is not None:
            self._clear(overwrite)

    def _clear(self, overwrite: bool) -> None:
        fs, path = filesystem(join(self.root, f"iter_{self.iteration}"))
        parts = fs.glob(path.rstrip("/") + "/part-*.parquet") if fs.exists(path) else []
        if parts and not overwrite:
            raise MilesError(
                f"{join(self.root, f'iter_{self.iteration}')} already holds {len(parts)} rollout part(s); "
                "pass overwrite (--overwrite) or another output / iteration"
            )
        for part in parts:
            fs.rm(part)

    def write(self, rows: list[dict[str, Any]]) -> str | None:
        if not rows:
            return None
        url = rollout_part_url(self.root, self.iteration, self.next_part)
        write_rollouts(rows, url)
        self.next_part += 1
        self.urls.append(url)
        return url
