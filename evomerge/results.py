"""An experiment's results as people see them, read from its store (read-only: a running search is never
disturbed): what `report` renders and `export` writes into a model card, with every estimate marked `~`
the same way in both."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from evomerge.config import source_labels
from evomerge.errors import UserError
from evomerge.store import (
    Candidate,
    ExperimentStore,
    Final,
    ItemResults,
    Score,
    item_evaluations,
    rank_key,
    rescore_owner,
)


@dataclass
class ExperimentView:
    dir: Path
    config: dict[str, Any]
    candidates: list[Candidate]
    finals: list[Final]
    config_dir: Path | None = None
    final_items: dict[str, dict[str, ItemResults]] = field(
        default_factory=dict
    )  # final name -> task -> items
    scores: list[Score] = field(default_factory=list)  # re-scores, anchor evidence, racing rungs
    models: dict[str, Any] | None = None  # where each model was found and its fingerprint (None: older runs)

    @classmethod
    def load(cls, path: str | Path) -> ExperimentView:
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"not a directory: {path}")
        store = ExperimentStore.open(path, readonly=True)
        try:
            config, models = store.meta_json("config", {}), store.meta_json("models")
            if not isinstance(config, dict):
                raise UserError(f"{path}: the journal's config record is damaged")
            config_dir = store.meta("config_dir")
            finals = store.finals()
            view = cls(
                path, config, store.candidates(), finals, Path(config_dir) if config_dir else None,
                {f.name: store.items(f"final:{f.name}") for f in finals}, store.scores(),
                models if isinstance(models, dict) else None,
            )  # fmt: skip
        finally:
            store.close()
        if not view.candidates:
            raise UserError(f"experiment {path} has no evaluations yet")
        return view

    @staticmethod
    def is_empty(path: str | Path) -> bool:
        """An experiment that has not journaled any evaluation yet (or whose database is unreadable)."""
        try:
            store = ExperimentStore.open(Path(path), readonly=True)
        except UserError:
            return False  # let `load` say what is wrong
        try:
            return store.count() == 0
        finally:
            store.close()

    @property
    def name(self) -> str:
        return self.config.get("name") or self.dir.name

    def candidate_items(self, ids: list[int]) -> dict[int, dict[str, ItemResults]]:
        """The journaled per-item search results of these candidates (read when a report needs them)."""
        store = ExperimentStore.open(self.dir, readonly=True)
        try:
            return {i: store.items(f"candidate:{i}") for i in ids}
        finally:
            store.close()

    @property
    def budget(self) -> int:
        return int(self.config.get("optimizer", {}).get("budget", len(self.candidates)))

    @property
    def tasks(self) -> dict[str, str | None]:
        """Task name -> the metric it contributes to fitness (None: the task's first)."""
        return {t["name"]: t.get("metric") for t in self.config.get("evaluation", {}).get("tasks", [])}

    @property
    def sources(self) -> list[str]:
        return source_labels(self.config.get("models", {}).get("sources", []))

    @property
    def ok(self) -> list[Candidate]:
        return [c for c in self.candidates if c.ok]

    @property
    def failures(self) -> Counter:
        return Counter(c.reason or "unknown" for c in self.candidates if not c.ok)

    def ranked(self) -> list[Candidate]:
        """Best first: by fitness on every search item where a candidate has one, then the estimates."""
        return sorted(self.ok, key=rank_key)

    @property
    def fidelity(self) -> dict[str, Any]:
        return self.config.get("evaluation", {}).get("fidelity") or {"mode": "full"}

    @property
    def item_evals(self) -> int:
        return item_evaluations(self.candidates, self.scores)

    @property
    def full_cost(self) -> int | None:
        """Item-evaluations one candidate costs on every search item (known once one was scored so)."""
        full = [c.item_evals for c in self.candidates if c.ok and not c.estimate and c.item_evals]
        full += [s.item_evals for s in self.scores if s.ok and s.owner.startswith(("rescore:", "prior:"))]
        return max(full) if full else None

    @property
    def best(self) -> Candidate | None:
        ranked = self.ranked()
        return ranked[0] if ranked else None

    @property
    def wall_seconds(self) -> float:
        return max(c.finished_at for c in self.candidates) - min(c.started_at for c in self.candidates)

    @property
    def evals_per_minute(self) -> float:
        busy = sum(c.merge_seconds + c.eval_seconds for c in self.candidates)
        return 60 * len(self.candidates) / busy if busy > 0 else math.nan

    @property
    def finished(self) -> bool:
        return any(f.kind == "evolved" for f in self.finals)

    def best_parent(self) -> Final | None:
        return self._best_final("parent")

    def best_default(self) -> Final | None:
        return self._best_final("default")

    def _best_final(self, kind: str) -> Final | None:
        finals = [f for f in self.finals if f.kind == kind and f.status == "ok"]
        return max(finals, key=lambda f: f.fitness) if finals else None

    @property
    def weights(self) -> dict[str, float]:
        return {
            t["name"]: float(t.get("weight", 1.0)) for t in self.config.get("evaluation", {}).get("tasks", [])
        }

    def metric(self, metrics: dict[str, Any], task: str) -> float | None:
        values = metrics.get(task, {})
        if not isinstance(values, dict):
            return None
        key = self.tasks.get(task) or next(iter(values), None)
        value = values.get(key) if key else None
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def task_scores(self, c: Candidate, task: str) -> tuple[float | None, float | None, float | None]:
        """A candidate's score on `task` as (on every search item, estimate, what its anchors measured):
        scored in full, the first only; estimated, the estimate and, once re-scored, the full score; under
        anchors, also the anchors' own score (the estimate is their weighted extrapolation)."""
        if not c.estimate:
            return self.metric(c.metrics, task), None, None
        rescored = self.rescores.get(rescore_owner(c))
        full = self.metric(rescored.metrics, task) if rescored is not None and rescored.ok else None
        if "estimate" in c.metrics and isinstance(c.metrics.get("estimate"), dict):  # anchors
            value = c.metrics["estimate"].get(task)
            estimate = float(value) if isinstance(value, int | float) else None
            return full, estimate, self.metric(c.metrics.get("anchors") or {}, task)
        return full, self.metric(c.metrics, task), None

    @property
    def heldout_sizes(self) -> dict[str, int]:
        """Held-out items per task, as the finals were scored on them."""
        sizes: dict[str, int] = {}
        for items in self.final_items.values():
            for task, results in items.items():
                sizes[task] = max(sizes.get(task, 0), len(results.ids))
        return sizes

    @cached_property
    def rescores(self) -> dict[str, Score]:
        return {s.owner: s for s in self.scores if s.owner.startswith("rescore:")}

    def best_so_far(self) -> list[float]:
        out, best = [], -math.inf
        for c in self.candidates:
            if c.ok:
                best = max(best, c.fitness)
            out.append(best)
        return out


# -- how a result is shown (report and model card alike) ------------------------------------------------


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def task_cell(view: ExperimentView, c, task: str) -> str:
    """A candidate's score on one task, every estimate marked `~` as search_fitness marks the fitness."""
    full, estimate, anchors = view.task_scores(c, task)
    if estimate is None:
        return fmt(full)
    marked = f"~{estimate:.4f}" + (f" (anchors {anchors:.4f})" if anchors is not None else "")
    return marked if full is None else f"{full:.4f} (estimate {marked})"


def search_fitness(c) -> str:
    """A full-split fitness as a number; an estimate marked `~` (with the re-score beside it, if any)."""
    if not c.estimate:
        return fmt(c.fitness)
    if c.rescored is not None:
        return f"{c.rescored:.4f} (estimate ~{c.fitness:.4f})"
    return f"~{c.fitness:.4f}"
