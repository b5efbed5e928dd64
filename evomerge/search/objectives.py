"""Several objectives at once: each a number read from a candidate's metrics, with a direction.

The loop keeps its one scalar fitness (the weighted sum: what progress, re-scores and single-objective
optimizers use); an experiment with `objectives:` also gives each candidate an objective vector, signed
so that higher is better everywhere (a `min` objective is negated), which multi-objective optimizers
are told and reports draw fronts from. Plain functions of plain data: no tensor, no store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LENGTH_METRIC = "generation_length,none"  # mean generated tokens per item, added to generation tasks


@dataclass(frozen=True)
class Objective:
    """One objective: `task`'s `metric` (the task's configured metric when None), maximised or not."""

    label: str
    task: str
    metric: str | None
    maximize: bool
    reference: float | None = None  # its coordinate of the hypervolume's reference point, when stated

    def raw(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        """The objective's value as the task reported it (NaN when absent)."""
        task = metrics.get(self.task) or {}
        if self.metric is not None:
            return float(task.get(self.metric, math.nan))
        return float(next(iter(task.values()), math.nan)) if task else math.nan

    def signed(self, metrics: Mapping[str, Mapping[str, float]]) -> float:
        value = self.raw(metrics)
        return value if self.maximize else -value


def objectives_of(config) -> list[Objective]:
    """The experiment's objectives (none for a single-objective experiment)."""
    return objectives_from(config.objectives or [], {t.name: t.metric for t in config.evaluation.tasks})


def objectives_from(specs, metric_of: Mapping[str, str | None]) -> list[Objective]:
    """Objectives of ObjectiveSpecs, each task metric defaulting to the task's configured one (`metric_of`)."""
    return [
        Objective(
            o.label,
            o.task_name,
            LENGTH_METRIC if o.generation_length is not None else (o.metric or metric_of.get(o.task)),
            o.maximize,
            o.reference,
        )
        for o in specs
    ]


def vector(objectives: Sequence[Objective], metrics: Mapping[str, Mapping[str, float]]) -> tuple[float, ...]:
    """The candidate's objective vector, higher better in every coordinate."""
    return tuple(o.signed(metrics) for o in objectives)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is at least as good as b everywhere and better somewhere (maximising)."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (maximising), in input order; duplicates all kept."""
    finite = [i for i, p in enumerate(points) if all(math.isfinite(x) for x in p)]
    return [i for i in finite if not any(dominates(points[j], points[i]) for j in finite if j != i)]


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The volume dominated by `points` and dominating `reference` (maximising): the standard quality
    of a front. Exact, by slicing along the first coordinate (fine for the tens of points a front has)."""
    ref = tuple(float(r) for r in reference)
    kept = [tuple(float(x) for x in p) for p in points]
    kept = [p for p in kept if len(p) == len(ref) and all(x > r for x, r in zip(p, ref, strict=True))]
    return _volume(kept, ref)


def _volume(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    ordered = sorted(points, key=lambda p: p[0], reverse=True)
    total, slab = 0.0, []
    for i, p in enumerate(ordered):
        slab.append(p[1:])
        low = ordered[i + 1][0] if i + 1 < len(ordered) else ref[0]
        if p[0] > low:
            total += (p[0] - low) * _volume(slab, ref[1:])
    return total
