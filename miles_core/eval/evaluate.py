"""Evaluation of generated samples: mean reward, pass@k, maj@k, overall and per source.

Input is a table of samples in the rollout schema (a rollouts Parquet, or samples just
generated): at least `prompt_id`, `sample_index`, `reward` and `response`. A sample counts as
correct when its reward is >= `correct_threshold` (1.0 by default: reasoning-gym scorers give
partial credit, which is not a solve). Every metric is a mean over prompts of a per-prompt value,
so a prompt with more samples does not weigh more, and two evaluations can be compared prompt by
prompt (see compare.py). The source of a sample is its `source` column, else `source` in its
metadata JSON, else "unknown".
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from miles_core.errors import MilesError
from miles_core.eval.majority import maj_at_k
from miles_core.eval.passk import pass_at_k
from miles_core.rewards.verifier import answer_key

__all__ = ["EvalResult", "evaluate_samples", "metric_names"]

_REQUIRED = ("prompt_id", "sample_index", "reward", "response")


@dataclass
class EvalResult:
    """`per_prompt`: one row per prompt (n, n_correct, mean_reward, pass@k, maj@k, source).

    `summary`: the JSON-ready aggregate (overall, by_source, counts, settings).
    """

    per_prompt: pa.Table
    summary: dict[str, Any]


def metric_names(ks: Sequence[int]) -> list[str]:
    return ["mean_reward", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks)]


def evaluate_samples(samples: pa.Table, ks: Sequence[int] = (1,), correct_threshold: float = 1.0) -> EvalResult:
    """Per-prompt and aggregate metrics of `samples` for each k in `ks` (every k <= samples per prompt)."""
    missing = [c for c in _REQUIRED if c not in samples.column_names]
    if missing:
        raise MilesError(f"samples lack column(s) {missing}; evaluation needs {list(_REQUIRED)}")
    if samples.num_rows == 0:
        raise MilesError("no samples to evaluate")
    ks = sorted({int(k) for k in ks})
    groups = _group(samples)
    _check_ks(groups, ks)
    rows = [_prompt_row(pid, g, ks, correct_threshold) for pid, g in groups.items()]
    per_prompt = pa.Table.from_pylist(rows)
    summary = {
        "n_prompts": len(rows),
        "n_samples": samples.num_rows,
        "ks": ks,
        "correct_threshold": correct_threshold,
        "overall": _aggregate(rows, ks),
        "by_source": {s: _aggregate([r for r in rows if r["source"] == s], ks) for s in _sources(rows)},
        "status_counts": _status_counts(samples),
        "reward_errors": sum(1 for g in groups.values() for s in g if s["meta"].get("reward_error")),
    }
    return EvalResult(per_prompt, summary)


def _group(samples: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Samples per prompt, ordered by sample_index; a repeated (prompt_id, sample_index) is an error."""
    cols = {c: samples.column(c).to_pylist() for c in samples.column_names if c in (*_REQUIRED, "metadata", "source")}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(samples.num_rows):
        meta = _meta(cols.get("metadata", [None] * samples.num_rows)[i])
        source = (cols["source"][i] if "source" in cols else None) or meta.get("source") or "unknown"
        reward = cols["reward"][i]
        groups[cols["prompt_id"][i]].append(
            {
                "index": cols["sample_index"][i],
                "reward": 0.0 if reward is None else float(reward),
                "response": cols["response"][i] or "",
                "source": str(source),
                "meta": meta,
            }
        )
    for pid, g in groups.items():
        g.sort(key=lambda s: s["index"])
        indices = [s["index"] for s in g]
        if len(set(indices)) != len(indices):
            raise MilesError(f"prompt {pid} has repeated sample_index values; samples were written twice")
    return dict(groups)


def _meta(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        meta = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _check_ks(groups: dict[str, list[dict[str, Any]]], ks: list[int]) -> None:
    if not ks or ks[0] < 1:
        raise MilesError(f"k values must be >= 1, got {ks}")
    pid, fewest = min(groups.items(), key=lambda kv: len(kv[1]))
    if ks[-1] > len(fewest):
        raise MilesError(
            f"k={ks[-1]} needs at least {ks[-1]} samples per prompt, but prompt {pid} has {len(fewest)}; "
            "lower --k or generate more samples"
        )


def _prompt_row(pid: str, group: list[dict[str, Any]], ks: list[int], threshold: float) -> dict[str, Any]:
    n = len(group)
    correct = [s["reward"] >= threshold for s in group]
    keys = [answer_key(s["response"]) for s in group]
    row: dict[str, Any] = {
        "prompt_id": pid,
        "source": group[0]["source"],
        "n": n,
        "n_correct": sum(correct),
        "mean_reward": sum(s["reward"] for s in group) / n,
    }
    row.update({f"pass@{k}": pass_at_k(n, sum(correct), k) for k in ks})
    row.update({f"maj@{k}": maj_at_k(keys, correct, k) for k in ks})
    return row


def _aggregate(rows: list[dict[str, Any]], ks: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_prompts": len(rows), "n_samples": sum(r["n"] for r in rows)}
    for name in metric_names(ks):
        out[name] = sum(r[name] for r in rows) / len(rows)
    return out


def _sources(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["source"] for r in rows})


def _status_counts(samples: pa.Table) -> dict[str, int]:
    if "status" not in samples.column_names:
        return {}
    return dict(sorted(Counter(samples.column("status").to_pylist()).items()))
