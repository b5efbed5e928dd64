"""Racing: successive halving inside a round. Every candidate starts on the round's first items; the best
1/eta by their estimate so far go on to eta x as many, up to the whole search split; a candidate is
journaled once its race is over, with its estimate on all the items it reached (see search/fidelity.py).
Each rung is an evaluation of its own (`rung:<generation>.<idx>.<rung>`), journaled as it lands."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.runtime.jobs import Job, Outcome
from evomerge.search.modes.base import CheapMode, owner, stored_values, values
from evomerge.store import Candidate


def rung_owner(generation: int, idx: int, rung: int) -> str:
    return owner(("rung", generation, idx, rung))


class Racing(CheapMode):
    name = "racing"

    def __init__(self, spec, plan, loop) -> None:
        super().__init__(spec, plan, loop)
        self._rung_values: dict[tuple[int, int, int], dict[str, dict[int, float]]] = {}
        self._races: dict[int, tuple[int, dict[int, list[int]]]] = {}  # round -> (rungs journaled, race)

    def candidate_job(self, key: tuple[int, int], recipe: dict) -> Job | None:
        generation, idx = key
        rung = self._next_rung(generation, idx)
        if rung is None:
            return None
        return Job(
            ("rung", generation, idx, rung),
            "search",
            recipe=recipe,
            items=self.plan.rung_items(generation, rung),
        )

    def scored(self, job: Job, outcome: Outcome) -> None:
        if job.key[0] == "rung":
            self._rung_values[job.key[1:]] = values(outcome.items) if outcome.ok else {}

    def losses(self, results: list[Candidate]) -> list[float]:
        """The race's order: a candidate that stopped at an earlier rung is placed below every one that
        went further (its loss is raised by the spread of the round's estimates per rung it missed)."""
        losses = super().losses(results)
        ok = [c.fitness for c in results if c.ok]
        spread = (max(ok) - min(ok) + 1.0) if ok else 1.0
        last = max((c.fidelity or {}).get("rung", 0) for c in results)
        return [
            loss + (last - (c.fidelity or {}).get("rung", 0)) * spread if c.ok else loss
            for loss, c in zip(losses, results, strict=True)
        ]

    def settle(self, rounds: dict[int, list[np.ndarray]]) -> None:
        """Journal every candidate whose race is over: failed at a rung, stopped by the race, or through
        the last rung. Its row holds the estimate on all the items it reached."""
        last = len(self.plan.rung_sizes()) - 1
        journal = self.loop.journal
        for generation, genomes in sorted(rounds.items()):
            size = self.loop.round_size(generation)
            if size == 0 or all((generation, i) in journal for i in range(size)):
                continue
            race = self._race(generation)
            for idx in range(min(size, len(genomes))):
                if (generation, idx) in journal:
                    continue
                rung = self._rungs_done(generation, idx)
                if rung is None:
                    continue
                score = self.loop.scores[rung_owner(generation, idx, rung)]
                stopped = rung + 1 in race and idx not in race[rung + 1]
                if score.ok and rung < last and not stopped:
                    continue
                self._add_racer(generation, idx, genomes[idx], rung, score.ok)

    # -- the race -----------------------------------------------------------------------------------

    def _next_rung(self, generation: int, idx: int) -> int | None:
        """The rung the candidate runs next, or None while the race has not decided it (or it is out)."""
        done = self._rungs_done(generation, idx)
        if done is None:
            return 0
        rung = done + 1
        if rung >= len(self.plan.rung_sizes()):
            return None
        going_on = self._race(generation).get(rung)
        return rung if going_on is not None and idx in going_on else None

    def _race(self, generation: int) -> dict[int, list[int]]:
        """Who runs each rung of the round, as far as the journaled rungs decide it: rung -> indices."""
        prefix = f"rung:{generation}."
        journaled = sum(1 for name in self.loop.scores if name.startswith(prefix))
        cached = self._races.get(generation)
        if cached is None or cached[0] != journaled:
            self._races[generation] = (journaled, self._run_race(generation))
        return self._races[generation][1]

    def _run_race(self, generation: int) -> dict[int, list[int]]:
        scores = self.loop.scores
        racers = list(range(self.loop.round_size(generation)))
        out = {0: racers}
        for rung in range(len(self.plan.rung_sizes()) - 1):
            keys = [rung_owner(generation, i, rung) for i in racers]
            if not racers or not all(k in scores for k in keys):
                break
            ranked = sorted(
                (i for i, k in zip(racers, keys, strict=True) if scores[k].ok),
                key=lambda i: (-self.plan.mean_estimate(self._values_through(generation, i, rung))[0], i),
            )
            racers = sorted(ranked[: math.ceil(len(racers) / self.spec.eta)])
            # a racer journaled as stopped at this rung stays stopped: only a raised budget, which adds
            # racers to a round that was cut short, can make the race pick it again
            racers = [i for i in racers if not self._stopped_at(generation, i, rung)]
            out[rung + 1] = racers
        return out

    def _rungs_done(self, generation: int, idx: int) -> int | None:
        """The last rung the candidate has journaled, or None before its first."""
        done = [
            k
            for k in range(len(self.plan.rung_sizes()))
            if rung_owner(generation, idx, k) in self.loop.scores
        ]
        return max(done) if done else None

    def _stopped_at(self, generation: int, idx: int, rung: int) -> bool:
        known = self.loop.journal.get((generation, idx))
        return known is not None and (known.fidelity or {}).get("rung") == rung

    def _values_through(self, generation: int, idx: int, rung: int) -> dict[str, dict[int, float]]:
        """The candidate's per-item values from rungs 0..rung together."""
        merged: dict[str, dict[int, float]] = {}
        for k in range(rung + 1):
            key = (generation, idx, k)
            if key not in self._rung_values:
                self._rung_values[key] = stored_values(self.loop.store.items(rung_owner(generation, idx, k)))
            for task, vals in self._rung_values[key].items():
                merged.setdefault(task, {}).update(vals)
        return merged

    def _add_racer(self, generation: int, idx: int, genome: np.ndarray, rung: int, ok: bool) -> None:
        owners = [rung_owner(generation, idx, k) for k in range(rung + 1)]
        scores = [self.loop.scores[o] for o in owners]
        vals = self._values_through(generation, idx, rung)
        fitness, estimates = self.plan.mean_estimate(vals)
        # the metric that makes each task's fitness: the same in every rung (rung 0 scores every task)
        metric = {task: r.metric for task, r in self.loop.store.items(owners[0]).items()}
        per_item = {
            task: {"metric": metric[task], "ids": sorted(v), "values": [v[i] for i in sorted(v)]}
            for task, v in vals.items()
        }
        metrics = {task: {metric[task]: value} for task, value in estimates.items()}
        outcome = Outcome(ok, fitness, metrics, scores[-1].reason, 0.0, 0.0, per_item if ok else {})
        fidelity = {"items": sum(s.item_evals for s in scores), "full": self.plan.is_full(vals), "rung": rung}
        started = min(s.finished_at - s.seconds for s in scores)
        self.loop.add(
            generation, idx, [float(x) for x in genome], self.loop.recipe(genome, generation, idx), started,
            outcome, fitness, metrics, fidelity, merge_seconds=0.0, eval_seconds=sum(s.seconds for s in scores),
        )  # fmt: skip

    @staticmethod
    def describe(fidelity: dict[str, Any]) -> str:
        what = f"racing: first rung {fidelity.get('items') or 'auto'} items per task, 1/{fidelity.get('eta')} go on"
        return CheapMode.cheap(what, fidelity)
