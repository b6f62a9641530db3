"""An evaluation on disk: `results.parquet` (one row per prompt) and `summary.json`.

Per-prompt results are kept, not just the summary, because comparing two checkpoints fairly
needs the paired, per-prompt values (compare.py). Both files are written atomically at any
fsspec URL; the summary is written last, so a folder with a summary has its results too.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.parquet as pq

from miles_core.errors import MilesError
from miles_core.eval.evaluate import EvalResult
from miles_core.io import atomic_write, filesystem, join

__all__ = ["RESULTS_FILE", "SUMMARY_FILE", "read_evaluation", "write_evaluation", "write_json"]

RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"


def write_json(obj: dict[str, Any], url: str) -> None:
    with atomic_write(url, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_evaluation(result: EvalResult, out_url: str) -> None:
    """Write `out_url/results.parquet` then `out_url/summary.json`."""
    with atomic_write(join(out_url, RESULTS_FILE)) as f:
        pq.write_table(result.per_prompt, f)
    write_json(result.summary, join(out_url, SUMMARY_FILE))


def read_evaluation(out_url: str) -> EvalResult:
    """Read an evaluation folder written by `write_evaluation`."""
    fs, _ = filesystem(out_url)
    summary_url, results_url = join(out_url, SUMMARY_FILE), join(out_url, RESULTS_FILE)
    for url in (summary_url, results_url):
        if not fs.exists(filesystem(url)[1]):
            raise MilesError(f"{out_url} is not an evaluation folder: {url} is missing")
    with fs.open(filesystem(summary_url)[1], "r") as f:
        summary = json.load(f)
    with fs.open(filesystem(results_url)[1], "rb") as f:
        per_prompt = pq.read_table(f)
    return EvalResult(per_prompt, summary)
