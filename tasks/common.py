"""What every stage task shares: retries on transient errors only, cache keys, manifest records,
local staging for fsspec artifact roots, Prefect artifacts and progress.

A stage is a plain function `fn(workdir, **params) -> metrics` from miles_core that writes its output
under a local directory. `run_stage` wraps it:

1. the cache key = stage name + parameters + content hashes of the input artifacts + the stage
   function's source code (so a code change invalidates the cache);
2. if the run's manifest already holds this stage with this key and its output exists, the stored
   reference is returned and nothing runs (a rerun resumes after the last finished stage);
3. otherwise the function runs into a local scratch folder, the folder is published to the
   artifact root (an atomic rename locally; an upload then a move for remote fsspec roots), its
   content hash is taken and the stage is recorded in the manifest, atomically.

The Prefect task around it retries with backoff only on transient errors (I/O, timeouts, and
`TransientError`); a `MilesError` (bad input, bad config) fails at once with its one-line message.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from miles_core.artifacts import ArtifactRef, Manifest, content_hash, stage_key
from miles_core.errors import MilesError, TransientError
from miles_core.io import filesystem, is_local

RETRIES = 2
RETRY_DELAYS = [1, 4]  # seconds, backoff between attempts


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying: I/O hiccups, timeouts, explicit TransientError. Never a MilesError."""
    if exc is None or isinstance(exc, MilesError):
        return False
    return isinstance(exc, (TransientError, OSError, TimeoutError, ConnectionError))


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: the failed state's data is the raised exception."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return is_transient(exc)


def prefect_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect's cache key for a stage task: the key run_stage computed (inputs, params, source)."""
    return f"{parameters['name']}-{parameters['key']}"


def source_hash(fn: Callable) -> str:
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def maybe_inject_fault(stage: str) -> None:
    """Fault injection for tests: MILES_INJECT_FAULT='rollout:2' fails the first 2 attempts of every
    'rollout*' stage with a TransientError. The attempt count lives in MILES_FAULT_STATE (a file)."""
    spec = os.environ.get("MILES_INJECT_FAULT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if not stage.startswith(name):
        return
    state = os.environ.get("MILES_FAULT_STATE", os.path.join(tempfile.gettempdir(), "miles-fault-state"))
    seen = 0
    if os.path.exists(state):
        with open(state) as f:
            seen = int(f.read() or 0)
    if seen < int(count or 1):
        with open(state, "w") as f:
            f.write(str(seen + 1))
        raise TransientError(f"injected transient failure {seen + 1} in stage {stage}")


def maybe_pause(stage: str) -> None:
    """Test hook: MILES_TEST_PAUSE='rollout/iter_1:5' sleeps 5 s inside that stage, after its work is
    written to scratch and before it is published, so a test can kill the process mid-stage."""
    spec = os.environ.get("MILES_TEST_PAUSE")
    if spec:
        name, _, seconds = spec.rpartition(":")
        if name == stage:
            time.sleep(float(seconds))


@contextlib.contextmanager
def local_input(url: str) -> Iterator[str]:
    """A local path holding the artifact at `url`: the path itself for local roots, a download otherwise."""
    if is_local(url):
        yield filesystem(url)[1]
        return
    fs, path = filesystem(url)
    tmp = tempfile.mkdtemp(prefix="miles-in-")
    try:
        dest = os.path.join(tmp, os.path.basename(path.rstrip("/")))
        fs.get(path.rstrip("/") + ("/" if fs.isdir(path) else ""), dest, recursive=True)
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(local_dir: str, url: str) -> None:
    """Move a finished local output to `url`, replacing what was there. Local: rename; remote: upload + move."""
    fs, path = filesystem(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.replace(local_dir, path)
        return
    tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    fs.put(local_dir.rstrip("/") + "/", tmp, recursive=True)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.mv(tmp, path, recursive=True)
    shutil.rmtree(local_dir, ignore_errors=True)


def scratch_for(url: str) -> str:
    """Where a stage writes before publishing: beside the target for local roots (same filesystem,
    so the final rename is atomic), a temp dir otherwise. Names start with '.' so nothing trusts them."""
    if is_local(url):
        path = filesystem(url)[1].rstrip("/")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for stale in glob.glob(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed attempt
        return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    return tempfile.mkdtemp(prefix="miles-out-")


def run_stage(
    name: str,
    fn: Callable[..., dict[str, Any]],
    out_url: str,
    run_root: str,
    inputs: dict[str, ArtifactRef],
    params: dict[str, Any],
    key: str | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> ArtifactRef:
    """Run stage `fn(out_dir, **local_inputs, **params)` unless the manifest already has it. See module doc."""
    key = key or stage_key(name, params, [r.content_hash for r in inputs.values()], source_hash(fn))
    manifest = Manifest(run_root)
    done = manifest.finished(name, key)
    if done is not None:
        return done
    maybe_inject_fault(name)
    start = time.time()
    with contextlib.ExitStack() as stack:
        local = {k: stack.enter_context(local_input(ref.uri)) for k, ref in inputs.items()}
        out_dir = scratch_for(out_url)
        try:
            extra = {"on_progress": on_progress} if "on_progress" in inspect.signature(fn).parameters else {}
            metrics = fn(out_dir, **local, **params, **extra) or {}
            maybe_pause(name)
            publish(out_dir, out_url)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
    ref = ArtifactRef(
        stage=name,
        uri=out_url,
        content_hash=content_hash(out_url),
        key=key,
        metrics=metrics,
        inputs=[r.content_hash for r in inputs.values()],
        seconds=time.time() - start,
    )
    manifest.record(name, ref)
    return ref
