"""Staged artifacts: references, content hashes, and a run's manifest.

Every pipeline stage leaves an artifact at an fsspec URL (a checkpoint folder, a rollouts folder,
an evaluation) and records it in the run's `manifest.json`: its inputs, output URL, content hash,
metrics and the stage's cache key. A rerun of the same run name reads the manifest and skips every
stage already finished with the same key whose output still exists, so a killed run resumes after
the last finished stage and a finished run does no work. The manifest is rewritten atomically.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pydantic import BaseModel, Field

from miles_core.io import atomic_write, filesystem, join

MANIFEST = "manifest.json"


class ArtifactRef(BaseModel):
    """What a stage returns: where its output lives and what it holds (never tensors)."""

    stage: str
    uri: str
    content_hash: str
    key: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list)  # content hashes of the inputs
    seconds: float = 0.0
    finished_at: float = 0.0


def content_hash(url: str) -> str:
    """sha256 over a file, or over a folder's relative paths and file contents in sorted order.

    Files and folders whose names start with '.' (temporaries) are skipped.
    """
    fs, path = filesystem(url)
    h = hashlib.sha256()
    if fs.isfile(path):
        files = [(path.rsplit("/", 1)[-1], path)]
    else:
        found = fs.find(path, withdirs=False)
        base = path.rstrip("/") + "/"
        files = []
        for f in sorted(found):
            rel = f[len(base) :] if f.startswith(base) else f
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            files.append((rel, f))
    for rel, f in files:
        h.update(rel.encode() + b"\0")
        with fs.open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def stage_key(stage: str, params: dict[str, Any], input_hashes: list[str], source: str = "") -> str:
    """Cache key: the stage name, its parameters, its inputs' content hashes and its code's source."""
    blob = json.dumps(
        {"stage": stage, "params": params, "inputs": input_hashes, "source": source}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class Manifest:
    """The run's record of finished stages, at `{run_root}/manifest.json`."""

    def __init__(self, run_root: str):
        self.run_root = run_root
        self.url = join(run_root, MANIFEST)
        self.data: dict[str, Any] = {"run_root": run_root, "stages": {}}
        fs, path = filesystem(self.url)
        if fs.exists(path):
            with fs.open(path, "r") as f:
                self.data = json.load(f)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def finished(self, name: str, key: str) -> ArtifactRef | None:
        """The recorded output of stage `name` if it finished with this key and its output still exists."""
        entry = self.stages.get(name)
        if not entry or entry.get("key") != key:
            return None
        fs, path = filesystem(entry["uri"])
        return ArtifactRef(**entry) if fs.exists(path) else None

    def record(self, name: str, ref: ArtifactRef) -> None:
        ref.finished_at = ref.finished_at or time.time()
        self.stages[name] = ref.model_dump()
        self.save()

    def save(self) -> None:
        with atomic_write(self.url, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
