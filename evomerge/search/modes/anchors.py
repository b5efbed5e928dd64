"""Anchors: candidates scored on anchor items chosen from the per-item results of models scored in full
(the finals' baselines before the search; every `refresh` rounds, that round's best, re-scored); the
estimate is the anchors' weighted mean (see search/fidelity.py)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from evomerge.runtime.jobs import Job, Outcome
from evomerge.search.fidelity import Anchors as AnchorSet
from evomerge.search.modes.base import CheapMode, rescore_jobs, stored_values, values
from evomerge.store import Candidate, rescore_owner

log = logging.getLogger("evomerge.search")


class Anchors(CheapMode):
    name = "anchors"

    def __init__(self, spec, plan, loop) -> None:
        super().__init__(spec, plan, loop)
        self._sets: dict[int, AnchorSet] = {}  # anchor version -> anchors

    def before_candidates(self, in_flight: dict):
        """The baselines' evidence (scored in full before the search), then each refresh round's best."""
        for name, recipe, source in self.loop.baselines():
            if f"prior:{name}" not in self.loop.scores and ("prior", name) not in in_flight:
                yield Job(("prior", name), "search", recipe=recipe, source=source), None
        yield from rescore_jobs(self._refresh_targets(), in_flight)

    def candidate_job(self, key: tuple[int, int], recipe: dict) -> Job | None:
        anchors = self._anchors(key[0])
        if anchors is None:
            return None
        return Job(("cand", *key), "search", recipe=recipe, items=anchors.items)

    def landed(self, job: Job, outcome: Outcome):
        outcome, fitness, metrics, fidelity = super().landed(job, outcome)
        if not outcome.ok:
            return outcome, fitness, metrics, fidelity
        generation = job.key[1]
        fidelity["anchors"] = self.plan.anchor_version(generation)
        try:
            fitness, estimates = self.plan.anchor_estimate(self._anchors(generation), values(outcome.items))
        except KeyError as exc:
            return (
                replace(outcome, ok=False, reason=f"no per-item result for {exc}"),
                fitness,
                metrics,
                fidelity,
            )
        return outcome, fitness, {"estimate": estimates, "anchors": outcome.metrics}, fidelity

    def _round_best(self, generation: int) -> Candidate | None:
        """The round's best candidate by the fitness the search saw, once the whole round is journaled."""
        size = self.loop.round_size(generation)
        results = [self.loop.journal.get((generation, i)) for i in range(size)]
        if size == 0 or any(c is None for c in results):
            return None
        ok = [c for c in results if c.ok]
        return max(ok, key=lambda c: (c.fitness, -c.idx)) if ok else None

    def _refresh_targets(self) -> list[Candidate]:
        out = []
        for generation in sorted({g for g, _ in self.loop.journal}):
            if self.plan.is_refresh_round(generation):
                best = self._round_best(generation)
                if best is not None and rescore_owner(best) not in self.loop.scores:
                    out.append(best)
        return out

    def _anchors(self, generation: int) -> AnchorSet | None:
        """The anchors round `generation` is scored on, or None while their evidence is not journaled."""
        version = self.plan.anchor_version(generation)
        if version in self._sets:
            return self._sets[version]
        owners = [f"prior:{name}" for name, _, _ in self.loop.baselines()]
        for refresh_round in self.plan.refresh_rounds(version):
            size = self.loop.round_size(refresh_round)
            if size == 0:
                continue
            best = self._round_best(refresh_round)
            if best is None and any((refresh_round, i) not in self.loop.journal for i in range(size)):
                return None
            if best is not None:
                owners.append(rescore_owner(best))
        if not all(o in self.loop.scores for o in owners):
            return None
        evidence = [stored_values(self.loop.store.items(o)) for o in owners if self.loop.scores[o].ok]
        anchors = self.plan.choose_anchors(evidence, version)
        self._sets[version] = anchors
        log.info(
            "anchors v%d: %s from %d models",
            version,
            {t: len(i) for t, i in anchors.items.items()},
            len(evidence),
        )
        return anchors

    @staticmethod
    def describe(fidelity: dict[str, Any]) -> str:
        what = (
            f"anchors: {fidelity.get('items')} anchor items per task, re-chosen every "
            f"{fidelity.get('refresh')} rounds"
        )
        return CheapMode.cheap(what, fidelity)
