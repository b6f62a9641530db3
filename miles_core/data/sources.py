"""One entry point for every prompt source: a spec string in, prompts and a load report out.

A spec is either an fsspec URL of a prompt file or folder (`data/math.jsonl`,
`memory://p/train.parquet`, `s3://bucket/prompts/`) or a reasoning-gym task
(`reasoning_gym:chain_sum`). Options may ride in a query string so that a spec is a complete,
copyable description of a prompt set on a command line:
`reasoning_gym:chain_sum?size=200&seed=3&split=eval&min_terms=3`. Query values win over the
keyword arguments; for reasoning-gym, keys other than size/seed/split/eval_fraction/system_prompt
are the task's own config.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from miles_core.data.files import FILE_SUFFIXES, read_prompt_file
from miles_core.data.gym import GYM_PREFIX, gym_prompts
from miles_core.data.prompt import Prompt
from miles_core.data.report import LoadReport
from miles_core.errors import MilesError
from miles_core.io import filesystem

__all__ = ["load_prompts", "load_sources", "parse_spec"]

_GYM_OPTIONS = ("size", "seed", "split", "eval_fraction", "system_prompt")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split `base?k=v&...` into the base and its options (values parsed as JSON when they can be)."""
    base, _, query = spec.partition("?")
    options: dict[str, Any] = {}
    for key, raw in parse_qsl(query, keep_blank_values=True):
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return base, options


def load_prompts(
    spec: str,
    *,
    size: int | None = None,
    seed: int = 0,
    split: str = "train",
    eval_fraction: float = 0.2,
    strict: bool = True,
) -> tuple[list[Prompt], LoadReport]:
    """Load the prompts of one source. `size` caps a file source and is required for reasoning-gym.

    strict: a malformed row raises a `MilesError` naming file and line; with strict=False such
    rows are skipped and listed in the returned report.
    """
    base, options = parse_spec(spec)
    if base.startswith(GYM_PREFIX):
        kwargs = {"size": size, "seed": seed, "split": split, "eval_fraction": eval_fraction}
        kwargs.update({k: options.pop(k) for k in _GYM_OPTIONS if k in options})
        if kwargs["size"] is None:
            raise MilesError(f"{spec}: a reasoning-gym source needs a size (size=N in the spec or --size)")
        name = base[len(GYM_PREFIX) :]
        prompts = gym_prompts(name, config=options, **kwargs)
        return prompts, LoadReport(source=base, n_rows=len(prompts), n_loaded=len(prompts))
    unknown = set(options) - {"size", "source"}
    if unknown:
        raise MilesError(f"{spec}: unknown option(s) {sorted(unknown)} for a file source (size, source)")
    size = options.get("size", size)
    prompts, report = _load_files(base, options.get("source"), strict)
    return (prompts if size is None else prompts[: int(size)]), report


def load_sources(specs: list[str], **kwargs: Any) -> tuple[list[Prompt], LoadReport]:
    """Load several sources into one list (e.g. a mixed evaluation set); reports are merged."""
    prompts: list[Prompt] = []
    report = LoadReport(source=", ".join(specs))
    for spec in specs:
        more, rep = load_prompts(spec, **kwargs)
        prompts.extend(more)
        report.merge(rep)
    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        raise MilesError(f"sources {specs} share prompt ids; load them separately or give each its own source")
    return prompts, report


def _load_files(url: str, source: str | None, strict: bool) -> tuple[list[Prompt], LoadReport]:
    """A file, or every prompt file directly inside a folder (sorted by name)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise MilesError(f"prompt source {url} does not exist")
    if not fs.isdir(path):
        return read_prompt_file(url, source=source, strict=strict)
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(FILE_SUFFIXES))
    if not files:
        raise MilesError(f"prompt folder {url} holds no {', '.join(FILE_SUFFIXES)} files")
    prompts: list[Prompt] = []
    report = LoadReport(source=url)
    for path_i in files:
        more, rep = read_prompt_file(fs.unstrip_protocol(path_i), source=source, strict=strict)
        prompts.extend(more)
        report.merge(rep)
    return prompts, report
