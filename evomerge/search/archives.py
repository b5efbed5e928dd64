"""The archives of an archive search (M2N2, MAP-Elites), rebuilt from the journal.

Neither optimizer's archive is saved: each is a pure function of the journaled candidates in the order
they were told (rounds in order, a round's candidates by index), so offering the journal to a new archive
in that order rebuilds what the search held after its last round. Reports draw the archives from this,
and the finals score each archive's best per task on the held-out split. Members are candidate ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.search.objectives import Objective, vector
from evomerge.search.optimizers import ItemArchive


@dataclass(frozen=True)
class Grid:
    """One MAP-Elites archive: the elites of `quality` over the other objectives (`measures`)."""

    quality: str
    measures: list[str]
    dims: list[int]
    cells: dict[tuple[int, ...], tuple[int, float]]  # cell -> (candidate id, quality)

    @property
    def coverage(self) -> float:
        return len(self.cells) / float(np.prod(self.dims)) if self.dims else 0.0


@dataclass
class Archive:
    """What an archive search keeps: its members (candidate ids), and for MAP-Elites its grids; for M2N2
    each member's item values (`scores`, rows as `members`, columns as `layout`: task and item ids)."""

    kind: str
    members: list[int]
    grids: list[Grid] = field(default_factory=list)
    scores: np.ndarray | None = None
    shared: np.ndarray | None = None  # M2N2's shared values (each item divided among its solvers)
    layout: list[tuple[str, list[int]]] = field(default_factory=list)


def rebuild(
    spec: Any,
    objectives: Sequence[Objective],
    weights: Mapping[str, float],
    candidates: Sequence[Any],
    items_of: Callable[[int], Mapping[str, Any]],
) -> Archive | None:
    """The archive of an m2n2 or map_elites search from its journaled candidates (None for the other
    optimizers). `items_of(candidate id)` loads a candidate's per-item search results (M2N2 only)."""
    told = sorted((c for c in candidates if c.ok), key=lambda c: (c.generation, c.idx))
    name = getattr(spec, "name", None)
    if name == "m2n2":
        archive = ItemArchive(spec.archive_size, spec.alpha, weights)
        for c in told:
            archive.offer(c.id, items_of(c.id))
        if not archive.members:
            return None
        return Archive(
            "m2n2", list(archive.members), scores=np.array(archive.scores), shared=archive.shared(),
            layout=archive.layout,
        )  # fmt: skip
    if name == "map_elites" and len(objectives) >= 2:
        grids = [_grid(spec.cells, objectives, k, told) for k in range(len(objectives))]
        members = sorted({cid for g in grids for cid, _ in g.cells.values()})
        return Archive("map_elites", members, grids=grids)
    return None


def _grid(cells: int, objectives: Sequence[Objective], k: int, told: Sequence[Any]) -> Grid:
    """Objective k's archive as the search's pyribs GridArchive holds it (each cell keeps the first
    candidate of the highest quality; values outside [0, 1] land in the edge cells)."""
    from ribs.archives import GridArchive

    others = [j for j in range(len(objectives)) if j != k]
    dims = [cells] * len(others)
    grid = GridArchive(solution_dim=1, dims=dims, ranges=[(0.0, 1.0)] * len(others))
    kept: dict[tuple[int, ...], tuple[int, float]] = {}
    for c in told:
        v = vector(objectives, c.metrics)
        if not all(np.isfinite(v)):
            continue
        measures = np.clip(np.array([[v[j] for j in others]], dtype=float), 0.0, 1.0)
        index = int(grid.index_of(measures)[0])
        cell = tuple(int(x) for x in np.unravel_index(index, dims))
        if cell not in kept or v[k] > kept[cell][1]:
            kept[cell] = (c.id, float(v[k]))
    return Grid(objectives[k].label, [objectives[j].label for j in others], dims, kept)


def best_per_task(
    archive: Archive,
    metric_of: Callable[[int, str], float],
    place: Callable[[int], tuple],
    tasks: Sequence[str],
) -> dict[str, int]:
    """The archive member with the best search value of each task (ties: the earlier place in the run,
    never the journal id, whose order depends on which worker finished first)."""
    best: dict[str, int] = {}
    for task in tasks:
        scored = [(metric_of(cid, task), cid) for cid in archive.members]
        scored = [(v, cid) for v, cid in scored if np.isfinite(v)]
        if scored:
            best[task] = min(scored, key=lambda s: (-s[0], place(s[1])))[1]
    return best


def task_objectives(tasks: Mapping[str, str | None]) -> list[Objective]:
    """Each task's configured metric as an objective (maximised): what "best per task" ranks by."""
    return [Objective(task, task, metric, True) for task, metric in tasks.items()]


def of_experiment(
    spec: Any,
    objectives: Sequence[Objective],
    tasks: Mapping[str, tuple[str | None, float]],
    candidates: Sequence[Any],
    items_of: Callable[[int], Mapping[str, Any]],
) -> tuple[Archive | None, dict[str, int]]:
    """The experiment's archive and its best member per task (by the task's search value); `tasks` maps
    each task to (metric, weight)."""
    archive = rebuild(spec, objectives, {t: w for t, (_, w) in tasks.items()}, candidates, items_of)
    if archive is None:
        return None, {}
    by_id = {c.id: c for c in candidates}
    per_task = {o.task: o for o in task_objectives({t: m for t, (m, _) in tasks.items()})}
    best = best_per_task(
        archive, lambda cid, task: per_task[task].raw(by_id[cid].metrics),
        lambda cid: (by_id[cid].generation, by_id[cid].idx), list(tasks),
    )  # fmt: skip
    return archive, best
