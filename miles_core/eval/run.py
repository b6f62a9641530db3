"""One evaluation end to end: samples in, results and (optionally) a comparison out.

`evaluate_rollouts` is what `miles eval --rollouts` and the evaluation flow call. Samples come
from a rollouts Parquet (a part, an `iter_N/` folder or a whole `rollouts/` root). Their stored
rewards are used as they are, unless prompt sources are given: then every sample is re-scored
against its prompt (found by prompt_id) with the chosen reward, and reward errors are counted in
the summary. Generating the samples first is `evaluate_model` (generate.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from miles_core.data.prompt import Prompt
from miles_core.data.rollouts import read_rollouts
from miles_core.data.sources import load_sources
from miles_core.errors import MilesError
from miles_core.eval.compare import compare_evaluations
from miles_core.eval.evaluate import EvalResult, evaluate_samples
from miles_core.eval.store import read_evaluation, write_evaluation, write_json
from miles_core.io import join
from miles_core.rewards.score import annotate_rows, score_samples

__all__ = ["COMPARISON_FILE", "EvalRun", "evaluate_rollouts", "finish_evaluation"]

COMPARISON_FILE = "comparison.json"


@dataclass
class EvalRun:
    result: EvalResult
    comparison: dict[str, Any] | None = None


def evaluate_rollouts(
    rollouts_url: str,
    out_url: str | None = None,
    ks: Sequence[int] = (1,),
    *,
    sources: Sequence[str] | None = None,
    size: int | None = None,
    split: str = "eval",
    reward: str | None = None,
    strict: bool = False,
    correct_threshold: float = 1.0,
    compare_to: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> EvalRun:
    """Evaluate the samples at `rollouts_url`; write to `out_url` (results, summary, comparison).

    sources/reward: re-score against these prompt sources with this reward spec (default auto);
    size/split: as in `load_prompts` (the sources must give the prompts the rollouts were made from);
    strict: a reward error raises instead of being counted.
    compare_to: a previous evaluation folder; the comparison is `this - that`, paired by prompt.
    """
    samples = read_rollouts(rollouts_url)
    score_counts = None
    if sources:
        samples, score_counts = _rescore(
            samples, load_sources(list(sources), size=size, split=split)[0], reward, strict
        )
    elif reward:
        raise MilesError("re-scoring with --reward needs the prompts' answers: pass --source too")
    result = evaluate_samples(samples, ks, correct_threshold)
    result.summary["rollouts"] = rollouts_url
    if score_counts is not None:
        result.summary["score_counts"] = score_counts
    return finish_evaluation(result, out_url, compare_to, n_boot=n_boot, seed=seed)


def finish_evaluation(
    result: EvalResult, out_url: str | None, compare_to: str | None, n_boot: int = 2000, seed: int = 0
) -> EvalRun:
    """Compare with `compare_to` (if given) and write everything under `out_url` (if given)."""
    comparison = None
    if compare_to:
        comparison = compare_evaluations(read_evaluation(compare_to), result, n_boot=n_boot, seed=seed)
        comparison.update(base=compare_to, new=out_url or result.summary.get("rollouts"))
    if out_url:
        write_evaluation(result, out_url)
        if comparison is not None:
            write_json(comparison, join(out_url, COMPARISON_FILE))
    return EvalRun(result, comparison)


def _rescore(samples: pa.Table, prompts: list[Prompt], reward: str | None, strict: bool):
    """Samples with fresh rewards (and a `source` column) from their prompts; plus the counts."""
    by_id = {p.prompt_id: p for p in prompts}
    rows = samples.to_pylist()
    unknown = sorted({r["prompt_id"] for r in rows} - set(by_id))
    if unknown:
        raise MilesError(
            f"{len(unknown)} prompt_id(s) of the rollouts are not in the given sources (e.g. {unknown[0]!r}); "
            "pass the sources (same size, seed and split) the rollouts were generated from"
        )
    matched = [by_id[r["prompt_id"]] for r in rows]
    scores = score_samples(matched, [r["response"] for r in rows], reward, strict=strict)
    rows = annotate_rows(rows, scores)
    for row, prompt in zip(rows, matched, strict=True):
        row["source"] = prompt.source
        row["metadata"] = json.dumps({**row["metadata"], "source": prompt.source}, default=str)
    return pa.Table.from_pylist(rows), scores.counts()
