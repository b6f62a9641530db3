"""Prefect flows: the RL pipeline, evaluation of a checkpoint, and scheduled retraining.

    rl_pipeline: [build demo base] -> convert -> quantize -> eval(before)
                 -> N x [rollout -> train -> sync (+ eval every k)] -> eval(after) -> export

Every stage is a task of tasks/stages.py: retried on transient errors, cached on its inputs'
content hashes, recorded in the run's manifest. Rerunning a run name resumes after its last
finished stage; rerunning a finished run does no work. Flow parameters are the pydantic models of
miles_core.config, so the Prefect UI shows them as a form.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from miles_core.artifacts import ArtifactRef, Manifest, content_hash
from miles_core.config import EvalConfig, PipelineConfig
from miles_core.io import join
from tasks import stages as t
from tasks.stages import artifact_key, call


def run_root(config: PipelineConfig) -> str:
    return join(config.artifact_root, "runs", config.run_name)


def _base(config: PipelineConfig, root: str) -> ArtifactRef:
    if config.model.hf_path:
        uri = config.model.hf_path
        return ArtifactRef(stage="base", uri=uri, content_hash=content_hash(uri))
    params = {"demo": config.model.demo.model_dump()}
    return call(t.build_base, "base", join(root, "base"), root, {}, params, config.run_name)


def _eval(config: PipelineConfig, root: str, weights: ArtifactRef, tag: str, ev: EvalConfig) -> ArtifactRef:
    params = {"eval": ev.model_dump(), "seed": config.seed}
    return call(t.evaluate, f"eval/{tag}", join(root, "eval", tag), root, {"weights": weights}, params, config.run_name)


@flow(name="miles-rl", log_prints=True)
def rl_pipeline(config: PipelineConfig = PipelineConfig()) -> dict[str, Any]:
    """The whole RL run. Returns the summary (pass@k before/after, per-iteration metrics, stage times)."""
    log = get_run_logger()
    root, run = run_root(config), config.run_name
    base = _base(config, root)
    ckpt = call(
        t.convert,
        "convert",
        join(root, "checkpoints", "iter_0"),
        root,
        {"hf": base},
        {"mtp_num_layers": config.model.mtp_num_layers},
        run,
    )
    qparams = {"format": config.quant.format, "group_size": config.quant.group_size}
    weights = call(t.quantize, "quantize", join(root, "weights", "iter_0"), root, {"ckpt": ckpt}, qparams, run)
    evals = {0: _eval(config, root, weights, "iter_0", config.eval)}
    rows, ro = [], None
    for i in range(1, config.iterations + 1):
        rparams = {
            "data": config.data.model_dump(),
            "sampling": config.rollout.model_dump(),
            "iteration": i,
            "seed": config.seed,
        }
        inputs = {"weights": weights}
        if config.rollout.partial_budget_tokens and ro is not None:
            inputs["carry"] = ro  # partial rollout: unfinished groups of the previous round resume first
        ro = call(t.rollout, f"rollout/iter_{i}", join(root, "rollouts", f"iter_{i}"), root, inputs, rparams, run)
        tparams = {"train": config.train.model_dump(), "iteration": i}
        ckpt = call(
            t.train,
            f"train/iter_{i}",
            join(root, "checkpoints", f"iter_{i}"),
            root,
            {"ckpt": ckpt, "rollouts": ro},
            tparams,
            run,
        )
        weights = call(t.sync, f"sync/iter_{i}", join(root, "weights", f"iter_{i}"), root, {"ckpt": ckpt}, qparams, run)
        if config.eval.every and i % config.eval.every == 0 and i < config.iterations:
            evals[i] = _eval(config, root, weights, f"iter_{i}", config.eval)
        rows.append(_iteration_row(i, ro, ckpt, weights, evals.get(i)))
        create_table_artifact(rows, key=artifact_key(run, "iterations"), description="per-iteration metrics")
        log.info("iteration %d: %s", i, rows[-1])
    if config.iterations:
        evals[config.iterations] = _eval(config, root, weights, f"iter_{config.iterations}", config.eval)
    hf = call(t.export, "export", join(root, "export"), root, {"ckpt": ckpt}, {}, run)
    summary = summarize(config, root, evals, rows, hf)
    create_markdown_artifact(summary["markdown"], key=artifact_key(run, "summary"), description="run summary")
    return summary


def _iteration_row(i: int, ro: ArtifactRef, ckpt: ArtifactRef, weights: ArtifactRef, ev: ArtifactRef | None):
    m, tm = ro.metrics, ckpt.metrics
    row = {
        "iteration": i,
        "reward_mean": m.get("reward_mean"),
        "rollout_tokens_per_s": m.get("tokens_per_s"),
        "mismatch_kl": tm.get("mismatch/k3_kl"),
        "mismatch_max_abs": tm.get("mismatch/abs_diff_max"),
        "routing_mismatch": tm.get("routing/mismatch_frac"),
        "clip_frac": tm.get("policy/clip_frac"),
        "grad_norm": tm.get("grad_norm"),
        "skipped_updates": tm.get("skipped_steps"),
        "rollout_s": round(ro.seconds, 2),
        "train_s": round(ckpt.seconds, 2),
        "sync_s": round(weights.seconds, 2),
    }
    if ev is not None:
        row["pass@1"] = ev.metrics.get("pass@1")
    return row


def summarize(
    config: PipelineConfig, root: str, evals: dict[int, ArtifactRef], rows: list[dict], hf: ArtifactRef
) -> dict[str, Any]:
    """Before/after evaluation with a paired bootstrap interval, per-iteration metrics, time per stage."""
    from miles_core.stages import compare_evals

    first, last = min(evals), max(evals)
    delta = compare_evals(evals[first].uri, evals[last].uri, seed=config.seed) if last != first else {}
    times: dict[str, float] = {}
    for name, entry in Manifest(root).stages.items():
        stage = name.split("/")[0]
        times[stage] = times.get(stage, 0.0) + float(entry.get("seconds", 0.0))
    before, after = evals[first].metrics, evals[last].metrics
    lines = [
        f"# miles run `{config.run_name}`",
        "",
        "| metric | before | after | delta (95% CI, paired bootstrap) |",
        "|---|---|---|---|",
    ]
    for k in config.eval.k:
        key = f"pass@{k}"
        d = delta.get(key, {})
        ci = f"{d.get('delta', 0):+.3f} [{d.get('low', 0):+.3f}, {d.get('high', 0):+.3f}]" if d else "-"
        lines.append(f"| {key} | {before.get(key, 0):.3f} | {after.get(key, 0):.3f} | {ci} |")
    if rows:
        first, last_row = rows[0].get("reward_mean") or 0.0, rows[-1].get("reward_mean") or 0.0
        lines += ["", f"rollout mean reward: iteration 1 {first:.3f} -> iteration {len(rows)} {last_row:.3f}"]
    kls = [r["mismatch_kl"] for r in rows if r.get("mismatch_kl") is not None]
    lines += ["", f"mean train-rollout mismatch KL (k3): {sum(kls) / len(kls):.2e}" if kls else ""]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {s} | {v:.1f} |" for s, v in times.items()]
    lines += ["", f"exported HF checkpoint: `{hf.uri}`"]
    return {
        "run_root": root,
        "before": before,
        "after": after,
        "delta": delta,
        "iterations": rows,
        "stage_seconds": times,
        "export": hf.uri,
        "markdown": "\n".join(lines),
    }


@flow(name="miles-eval", log_prints=True)
def evaluate(
    model_uri: str, eval: EvalConfig = EvalConfig(), artifact_root: str = "artifacts", name: str = "eval", seed: int = 0
) -> dict[str, Any]:
    """Evaluate one checkpoint (HF, FP8/INT4 HF, or torch_dist folder) against an eval source."""
    root = join(artifact_root, "evals", name)
    weights = ArtifactRef(stage="model", uri=model_uri, content_hash=content_hash(model_uri))
    params = {"eval": eval.model_dump(), "seed": seed}
    ref = call(t.evaluate, "eval", join(root, "result"), root, {"weights": weights}, params, name)
    create_table_artifact([{"model": model_uri, **ref.metrics}], key=artifact_key(name, "eval"))
    return ref.metrics


@flow(name="miles-retrain", log_prints=True)
def retrain(config: PipelineConfig = PipelineConfig(), more_iterations: int = 2) -> dict[str, Any]:
    """Continue a run from its newest checkpoint for `more_iterations` iterations on fresh prompts.

    Iteration i draws its own slice of the prompt source, so new iterations see prompts the run has
    not trained on; everything already finished is taken from the manifest, nothing is redone.
    """
    done = sum(1 for name in Manifest(run_root(config)).stages if name.startswith("train/"))
    return rl_pipeline.fn(config.model_copy(update={"iterations": done + more_iterations}))
