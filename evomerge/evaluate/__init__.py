"""Fitness: lm-eval scores of a resident model. The evaluator (torch, lm-eval) loads on first use, so the
config schema (evaluate/spec.py) loads without them."""

from __future__ import annotations

import importlib

from evomerge.evaluate.spec import EvaluationSpec, SplitSpec, TaskSpec

__all__ = ["EvalResult", "EvaluationSpec", "Evaluator", "SplitSpec", "TaskSpec", "split_indices"]


def __getattr__(name: str):
    if name in ("EvalResult", "Evaluator", "split_indices"):
        return getattr(importlib.import_module(f"{__name__}.evaluator"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
