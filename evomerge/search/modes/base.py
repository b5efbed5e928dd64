"""The interface between the search loop and a fidelity mode (which search items a candidate pays for).

The loop (search/run.py) knows ask, submit, land and tell; everything that differs between full fitness
and the cheap modes is a `FidelityMode`: the jobs it needs before candidates can run (anchor evidence),
the job that scores a candidate next (or none yet), what a candidate's landed result journals as, what it
does with an evaluation that is not a candidate's own (racing's rungs), candidates whose race is over,
what the optimizer is told, which candidates are re-scored on every search item, and how the mode
describes itself to people. A mode reads and changes the run only through `Loop`, which the loop hands it;
it imports nothing of the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from evomerge.runtime.jobs import Job, Outcome
from evomerge.search.fidelity import ItemPlan
from evomerge.search.optimizers import Feedback
from evomerge.store import Candidate, ExperimentStore, ItemResults, Score, rescore_owner

FAILED_LOSS = 1e9  # what the optimizer is told for a failed candidate: worse than any real loss


@dataclass
class Loop:
    """What a mode may read and do in the run: the journal as the loop holds it (candidates by
    (generation, idx), other evaluations by owner), and the loop's services."""

    store: ExperimentStore
    journal: dict[tuple[int, int], Candidate]
    scores: dict[str, Score]
    round_size: Callable[[int], int]  # candidates of a round within the budget
    recipe: Callable[[np.ndarray, int, int], dict]  # a genome's recipe at (generation, idx)
    baselines: Callable[
        [], list[tuple[str, dict | None, int | None]]
    ]  # (name, recipe, source) of the finals'
    add: Callable[..., Candidate]  # journal a candidate (racing journals a racer once its race is over)
    objectives: Callable[[dict], tuple[float, ...]] | None = None  # a candidate's vector, from its metrics


class FidelityMode:
    """Full fitness: every candidate on every search item. The cheap modes override what differs."""

    name: ClassVar[str] = "full"
    uses_items: ClassVar[bool] = False  # scores candidates on chosen items (needs the search split's ids)

    def __init__(self, spec, plan: ItemPlan | None, loop: Loop) -> None:
        self.spec, self.plan, self.loop = spec, plan, loop

    # -- what runs ---------------------------------------------------------------------------------------

    def before_candidates(self, in_flight: dict) -> Iterator[tuple[Job, None]]:
        """Jobs that must run before (or beside) the candidates: none."""
        return iter(())

    def candidate_job(self, key: tuple[int, int], recipe: dict) -> Job | None:
        """The job that scores candidate `key` next, or None while what it needs is not journaled."""
        return Job(("cand", *key), "search", recipe=recipe)

    def settle(self, rounds: dict[int, list[np.ndarray]]) -> None:
        """Journal candidates whose evaluation is over outside their own job (racing): none here."""

    # -- what lands ----------------------------------------------------------------------------------------

    def landed(self, job: Job, outcome: Outcome) -> tuple[Outcome, float, dict[str, Any], dict[str, Any]]:
        """(outcome, fitness, metrics, fidelity record) a candidate's own job journals as."""
        fidelity = {
            "items": outcome.item_evals,
            "full": job.items is None or (self.plan is not None and self.plan.is_full(values(outcome.items))),
        }
        return outcome, outcome.fitness, outcome.metrics, fidelity

    def scored(self, job: Job, outcome: Outcome) -> None:
        """An evaluation that is not a candidate's own landed (anchor evidence, a re-score, a rung)."""

    # -- what the optimizer is told, and what is re-scored ---------------------------------------------

    def losses(self, results: list[Candidate]) -> list[float]:
        """Minus each candidate's fitness (an estimate under a cheap mode); failures worst."""
        return [-c.fitness if c.ok else FAILED_LOSS for c in results]

    def feedback(self, results: list[Candidate]) -> list[Feedback]:
        """What the optimizer is told of a complete round: each candidate's loss (as `losses` orders
        them), its objective vector and a loader of its per-item results."""
        store, objectives = self.loop.store, self.loop.objectives
        return [
            Feedback(
                loss,
                objectives(c.metrics) if objectives is not None and c.ok else (c.fitness,),
                (lambda c=c: store.items(f"candidate:{c.id}")) if c.ok else None,
            )
            for loss, c in zip(self.losses(results), results, strict=True)
        ]

    def rescore_targets(self) -> list[Candidate]:
        """Candidates to score on every search item once the budget is spent: none at full fidelity."""
        return []

    # -- for people -------------------------------------------------------------------------------------

    @staticmethod
    def describe(fidelity: dict[str, Any]) -> str:
        """What the mode did, for the report (from the journaled config's fidelity section)."""
        return "full: every search item for every candidate"

    @staticmethod
    def summary(spec) -> str:
        """One phrase for `validate`'s search line."""
        return "full fitness"


class CheapMode(FidelityMode):
    """A mode that scores candidates on part of the search split: the best estimates are re-scored."""

    uses_items = True

    def rescore_targets(self) -> list[Candidate]:
        """The best `rescore_top` candidates by estimate that have no fitness on every search item yet."""
        ranked = sorted(
            (c for c in self.loop.journal.values() if c.ok), key=lambda c: (-c.fitness, c.generation, c.idx)
        )
        top = ranked[: self.spec.rescore_top]
        return [c for c in top if c.estimate and rescore_owner(c) not in self.loop.scores]

    @staticmethod
    def summary(spec) -> str:
        return (
            f"{spec.mode} fitness ({spec.items or 'auto'} items per task, best {spec.rescore_top} re-scored)"
        )

    @staticmethod
    def cheap(what: str, fidelity: dict[str, Any]) -> str:
        return (
            f"{what}; search fitness is an estimate (~) unless marked full; top {fidelity.get('rescore_top')} "
            "re-scored in full"
        )


def rescore_jobs(candidates: list[Candidate], in_flight: dict) -> Iterator[tuple[Job, None]]:
    """Jobs re-scoring each candidate on every search item, unless already running."""
    for c in candidates:
        key = ("rescore", c.generation, c.idx)
        if key not in in_flight:
            yield Job(key, "search", recipe=c.recipe), None


def owner(key: tuple) -> str:
    """The journal's name of a job that is not a candidate's own evaluation."""
    kind, *rest = key
    return f"{kind}:" + ".".join(map(str, rest))


def values(items: dict[str, dict]) -> dict[str, dict[int, float]]:
    """An outcome's per-item results as {task: {item id: value}}."""
    return {
        task: dict(zip((int(i) for i in d["ids"]), (float(v) for v in d["values"]), strict=True))
        for task, d in items.items()
    }


def stored_values(items: dict[str, ItemResults]) -> dict[str, dict[int, float]]:
    return {task: dict(zip(r.ids.tolist(), r.values.tolist(), strict=True)) for task, r in items.items()}
