"""Fitness: lm-eval scores of a resident model."""

from evomerge.evaluate.evaluator import EvalResult, Evaluator, split_indices
from evomerge.evaluate.spec import EvaluationSpec, SplitSpec, TaskSpec

__all__ = ["EvalResult", "EvaluationSpec", "Evaluator", "SplitSpec", "TaskSpec", "split_indices"]
