"""Evaluation: pass@k, maj@k, mean reward per source; results on disk; paired comparisons.

run = evaluate_rollouts("runs/x/rollouts/iter_3", "runs/x/eval/iter_3", ks=[1, 4, 8])
run.result.summary["overall"]["pass@4"]
run = evaluate_model("ckpt/hf", ["reasoning_gym:chain_sum?size=100"], "runs/x/eval/base", ks=[1, 4])
"""

from miles_core.eval.compare import compare_evaluations, paired_bootstrap
from miles_core.eval.evaluate import EvalResult, evaluate_samples, metric_names
from miles_core.eval.generate import evaluate_model, generation_available
from miles_core.eval.majority import maj_at_k, majority_vote
from miles_core.eval.passk import pass_at_k
from miles_core.eval.run import EvalRun, evaluate_rollouts, finish_evaluation
from miles_core.eval.store import read_evaluation, write_evaluation

__all__ = [
    "EvalResult",
    "EvalRun",
    "compare_evaluations",
    "evaluate_model",
    "evaluate_rollouts",
    "evaluate_samples",
    "finish_evaluation",
    "generation_available",
    "maj_at_k",
    "majority_vote",
    "metric_names",
    "paired_bootstrap",
    "pass_at_k",
    "read_evaluation",
    "write_evaluation",
]
