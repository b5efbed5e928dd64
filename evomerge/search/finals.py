"""The finals: once the budget is spent, the winner (best fitness on every search item), each source
alone and the default merges are scored on the held-out split, once each, and journaled. The same
baselines are the anchor evidence of the anchors mode."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from evomerge.config import ExperimentConfig
from evomerge.errors import UserError
from evomerge.merge.methods import Method
from evomerge.merge.recipe import Recipe
from evomerge.runtime.jobs import Executor, Job, Outcome
from evomerge.search.archives import Archive, of_experiment
from evomerge.search.objectives import objectives_of, pareto_front, vector
from evomerge.search.schedule import candidate_seed
from evomerge.search.space import default_params
from evomerge.store import ExperimentStore, Final, rank_key

log = logging.getLogger("evomerge.search")
FRONT = "front candidate "  # the finals of the Pareto front's members (kind "evolved")
ARCHIVE = "archive candidate "  # an archive's best member for a task that is not on the front
MAX_FRONT = 16


class Finals:
    def __init__(
        self,
        config: ExperimentConfig,
        store: ExperimentStore,
        source_names: list[str],
        groups: list[str],
        executor: Callable[[], Executor],
        stage: Callable[[str], None],
        finite: Callable[[Outcome], Outcome],
    ) -> None:
        self.config, self.store, self.source_names, self.groups = config, store, source_names, groups
        self.executor, self.stage, self.finite = executor, stage, finite
        self.start_recipe: dict | None = None  # a migrated mergekit-evolve run's initial genotype

    def baselines(self) -> list[tuple[str, dict | None, int | None]]:
        """(name, recipe, source) of the parents and default merges."""
        jobs = [(f"parent {label}", None, i) for i, label in enumerate(self.source_names)]
        if self.config.dfs is not None:
            return jobs
        method = self.config.merge.method
        methods = [method] + [m for m in self.default_methods() if m is not method]
        return jobs + [(f"default {m.value}", self.default_recipe(m), None) for m in methods]

    def run(self) -> list[Final]:
        """Score the best recipe, each parent and the default merges on the held-out split (once each)."""
        best = self.store.winner()
        if best is None:
            raise UserError(f"no candidate succeeded; see {self.store.dir / 'search.log'}")
        have = {f.name: f for f in self.store.finals()}
        front = self.front(exclude=best.id)
        moved = "evolved" in have and have["evolved"].candidate_id != best.id  # a longer run's better recipe
        moved |= bool(
            {n for n in have if n.startswith((FRONT, ARCHIVE))} - {name for name, *_ in front}
        )  # or the front, or an archive's best
        if moved:  # score the winner and the front again
            self.store.clear_finals("evolved")
            have = {f.name: f for f in self.store.finals()}
        jobs = [("evolved", "evolved", best.id, best.recipe), *front]
        if self.config.dfs is not None:  # DFS merges no weights: the baselines are the sources themselves
            jobs += [(f"parent {label}", "parent", i, None) for i, label in enumerate(self.source_names)]
            return self._run(jobs, have)
        method = self.config.merge.method
        methods = [method] + [m for m in self.default_methods() if m is not method]
        jobs.append((f"default {method.value}", "default", None, self.default_recipe(method)))
        jobs += [(f"parent {label}", "parent", i, None) for i, label in enumerate(self.source_names)]
        jobs += [(f"default {m.value}", "default", None, self.default_recipe(m)) for m in methods[1:]]
        return self._run(jobs, have)

    def front(self, exclude: int | None = None) -> list[tuple[str, str, int, dict]]:
        """Final jobs for the search's Pareto front (objective vectors from the journaled search-split
        metrics: estimates under cheap fitness), at most MAX_FRONT members by fitness, the winner left out
        (its `evolved` final is one), then each archive's best member per task that is neither. Empty for
        a single-objective experiment without an archive."""
        objectives = objectives_of(self.config)
        candidates = self.store.candidates()
        ok = [c for c in candidates if c.ok]
        unique = []
        if objectives:
            vectors = [vector(objectives, c.metrics) for c in ok]
            members = sorted(pareto_front(vectors), key=lambda i: rank_key(ok[i]))
            seen = set()
            for i in members:  # one member per objective vector, the fittest
                if vectors[i] not in seen:
                    seen.add(vectors[i])
                    unique.append(ok[i])
        jobs = [(f"{FRONT}{c.id}", "evolved", c.id, c.recipe) for c in unique[:MAX_FRONT] if c.id != exclude]
        _, best = self.archive(candidates)
        by_id = {c.id: c for c in ok}
        taken = {exclude, *(c.id for c in unique[:MAX_FRONT])}
        for cid in dict.fromkeys(best.values()):  # each archive's best per task, once, if not scored already
            if cid not in taken:
                jobs.append((f"{ARCHIVE}{cid}", "evolved", cid, by_id[cid].recipe))
        return jobs

    def archive(self, candidates=None) -> tuple[Archive | None, dict[str, int]]:
        """The search's archive (M2N2, MAP-Elites) rebuilt from the journal, and its best member per task."""
        tasks = {t.name: (t.metric, t.weight) for t in self.config.evaluation.tasks}
        return of_experiment(
            self.config.optimizer, objectives_of(self.config), tasks,
            self.store.candidates() if candidates is None else candidates,
            lambda cid: self.store.items(f"candidate:{cid}"),
        )  # fmt: skip

    def _run(self, jobs: list, have: dict) -> list[Final]:
        todo = [job for job in jobs if job[0] not in have]
        by_name = {job[0]: job for job in todo}
        executor = self.executor() if todo else None
        running = 0
        while todo or running:
            while todo and running < executor.capacity:
                name, kind, ref, recipe = todo.pop(0)
                self.stage(f"held-out: {name}")
                source = ref if kind == "parent" else None
                executor.submit(Job(name, "heldout", recipe=recipe, source=source))
                running += 1
            for job, outcome in executor.wait():
                running -= 1
                outcome = self.finite(outcome)
                name, kind, ref, recipe = by_name[job.key]
                self.store.record_final(
                    Final(
                        name,
                        kind,
                        ref if kind == "evolved" else None,
                        recipe,
                        "heldout",
                        "ok" if outcome.ok else "failed",
                        outcome.reason,
                        outcome.fitness if outcome.ok else -math.inf,
                        outcome.metrics,
                        outcome.merge_seconds + outcome.eval_seconds,
                        time.time(),
                    ),  # fmt: skip
                    outcome.items if outcome.ok else None,
                )
                log.info(
                    "held-out %s: %s",
                    name,
                    f"{outcome.fitness:.4f}" if outcome.ok else f"failed ({outcome.reason})",
                )
        return self.store.finals()

    def default_methods(self) -> list[Method]:
        """The standard default merges that fit the models (with a base: the task-vector methods and, for
        one source, SLERP; without: linear), in the methods' `finals` order, then `merge.baselines`."""
        has_base = self.config.models.base is not None
        count = len(self.source_names)
        fits = [
            m for m in Method
            if m.spec.finals is not None and m.spec.needs_base == has_base and m.spec.inputs in (None, count)
        ]  # fmt: skip
        chosen = sorted(fits, key=lambda m: m.spec.finals)
        return chosen + [m for m in self.config.merge.baselines if m not in chosen]

    def default_recipe(self, method: Method) -> dict:
        if self.start_recipe is not None and method is self.config.merge.method:
            return self.start_recipe
        params = default_params(method, len(self.source_names))
        groups = {g: params for g in self.groups}
        exclude = tuple(self.config.merge.exclude) if method.spec.param("exclude") is not None else ()
        recipe = Recipe(
            method, groups, seed=candidate_seed(self.config.optimizer.seed, -1, 0), exclude=exclude
        )
        return recipe.to_dict()
