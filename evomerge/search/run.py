"""`evomerge search`: evolve recipes, journal every evaluation, resume exactly, score the finalists.

The loop knows four things: ask (the round schedule, search/schedule.py), submit (jobs go to an executor
as it has room), land (each result is journaled the moment it arrives) and tell (a round is told once all
of it is journaled). Which items a candidate pays for, and everything else that differs between full
fitness and the cheap modes, is the fidelity mode's (search/modes/); the held-out finals are
search/finals.py's. Nothing of the optimizer is saved: resuming builds it afresh from the config and
replays the journal (every complete round told its journaled losses, every asked candidate checked
against the journaled genome), then evaluates only the missing candidates, so a run killed any number of
times ends exactly where the uninterrupted run ends, and an experiment directory holds only data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from evomerge.config import ExperimentConfig, source_labels
from evomerge.errors import UserError
from evomerge.merge.recipe import Recipe
from evomerge.runtime.executor import make_executor
from evomerge.runtime.jobs import Executor, Job, Outcome, WorkerFactory
from evomerge.search.dfs_space import DfsSpace
from evomerge.search.evolve_space import EvolveSpace
from evomerge.search.fidelity import ItemPlan
from evomerge.search.finals import Finals
from evomerge.search.modes import MODES, Loop, make_mode
from evomerge.search.modes.base import FAILED_LOSS, owner, rescore_jobs
from evomerge.search.objectives import objectives_of, vector
from evomerge.search.optimizers import make_optimizer, round_size
from evomerge.search.schedule import Schedule, candidate_seed, resolve_overlap
from evomerge.search.space import Space
from evomerge.store import Candidate, ExperimentStore, Final, Score, item_evaluations

__all__ = [
    "FAILED_LOSS",
    "Reporter",
    "Schedule",
    "Search",
    "SearchInputs",
    "candidate_seed",
    "resolve_overlap",
]

log = logging.getLogger("evomerge.search")


class Reporter(Protocol):
    """Where the loop reports progress (a rich bar on a terminal, log lines otherwise)."""

    def start(self, done: int, budget: int, best: str | None) -> None: ...

    def evaluated(self, candidate: Candidate, done: int, best: str | None, item_evals: int = 0) -> None: ...

    def stage(self, text: str) -> None: ...

    def note(self, text: str) -> None: ...


@dataclass(frozen=True)
class SearchInputs:
    """What the loop needs to know of the models and tasks, opened by the layers that own them (see
    `experiment.search_inputs`): the loop itself opens no model header and no task."""

    num_layers: int  # of the base (or the first source): the depth of a PS genome
    source_layers: list[int]  # per source: the slots of a DFS genome
    manager: Any  # the lm-eval task manager workers build their tasks from
    search_items: dict[str, list[int]] | None  # the search split's item ids (modes that choose items)


class Search:
    def __init__(
        self,
        config: ExperimentConfig,
        config_dir: Path | None,
        store: ExperimentStore,
        inputs: SearchInputs,
        reporter: Reporter | None = None,
        worker_factory: WorkerFactory | None = None,
    ) -> None:
        self.config, self.config_dir, self.store, self.reporter = config, config_dir, store, reporter
        self.budget = config.optimizer.budget
        self.manager = inputs.manager
        self.num_layers = inputs.num_layers
        self.source_names = source_labels(config.models.sources)
        if config.dfs is not None:
            self.space = DfsSpace(config.dfs, inputs.source_layers, config.dfs_ends())
        elif config.mergekit_genome is not None:
            self.space = EvolveSpace(config, self.num_layers)
        else:
            self.space = Space(
                config.space, config.merge.method, len(inputs.source_layers), self.num_layers,
                seed=config.optimizer.seed,
            )  # fmt: skip
        self.worker_factory = worker_factory
        self._executor: Executor | None = None
        self.fidelity = config.evaluation.fidelity
        self.plan: ItemPlan | None = None
        if MODES[self.fidelity.mode].uses_items:  # the items each round may draw from
            self.plan = ItemPlan(
                self.fidelity, config.evaluation.tasks, inputs.search_items, config.evaluation.split.seed
            )
        self.objectives = objectives_of(config)
        self._journal: dict[tuple[int, int], Candidate] = {}
        self._scores: dict[str, Score] = {}
        groups = getattr(self.space, "all_groups", [])
        self.finals = Finals(
            config, store, self.source_names, groups, lambda: self.executor, self._stage, _finite
        )
        if isinstance(self.space, EvolveSpace):  # the default merge is mergekit-evolve's starting point
            self.finals.start_recipe = self.space.decode(self.space.initial())
        self.mode = make_mode(
            self.fidelity,
            self.plan,
            Loop(
                store,
                self._journal,
                self._scores,
                self._round_size,
                self.recipe,
                self.finals.baselines,
                self._add,
                self._objective_vector if self.objectives else None,
            ),
        )
        self.optimizer_batch = 0
        self._best: Candidate | None = None  # by the fitness the search saw (progress only)

    @property
    def executor(self) -> Executor:
        """Started on first use: a finished experiment reopened only to print its results loads no model."""
        if self._executor is None:
            self._executor = make_executor(
                self.config, self.config_dir, self.manager, self.worker_factory, self._stage
            )
        return self._executor

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def _seed_genomes(self) -> list[np.ndarray]:
        """Where an archive starts (M2N2): each source alone and the default merge, as genomes; for a
        layer path, model A's own path."""
        if isinstance(self.space, DfsSpace):
            return [self.space.start()]
        genomes = [self.space.source_genome(k) for k in range(len(self.source_names))]
        if isinstance(self.space, EvolveSpace):
            return [*genomes, self.space.initial()]
        for _, recipe, _ in self.finals.baselines():
            if recipe is None or recipe.get("method") != self.config.merge.method.value:
                continue
            try:
                genomes.append(self.space.encode(Recipe.from_dict(recipe)))
            except (KeyError, TypeError, IndexError):
                continue  # a default merge that leaves a searched parameter unset (breadcrumbs' gamma)
        return genomes

    def _objective_vector(self, metrics: dict) -> tuple[float, ...]:
        return vector(self.objectives, metrics)

    def _stage(self, text: str) -> None:
        log.info(text)
        if self.reporter:
            self.reporter.stage(text)

    def recipe(self, genome: np.ndarray, generation: int, idx: int) -> dict:
        """The candidate's recipe as plain data (what the journal stores and the worker takes)."""
        if isinstance(self.space, DfsSpace):
            return self.space.decode(genome).to_dict()
        if isinstance(self.space, EvolveSpace):
            return self.space.decode(genome)
        seed = candidate_seed(self.config.optimizer.seed, generation, idx)
        recipe = self.space.decode(
            genome, seed=seed, normalize=self.config.merge.normalize, rescale=self.config.merge.rescale
        )
        recipe.exclude = tuple(self.config.merge.exclude)
        return recipe.to_dict()

    def _schedule(self) -> Schedule:
        """A new schedule; `run` replays the journal through it (a resumed run continues exactly)."""
        spec, popsize = self.config.optimizer, self.space.default_popsize()
        overlap = resolve_overlap(spec, round_size(spec, popsize))
        seeds = self._seed_genomes() if spec.name == "m2n2" else []
        optimizer = make_optimizer(
            spec, self.space.start(), popsize, overlap, max(1, len(self.objectives)), seeds,
            {t.name: t.weight for t in self.config.evaluation.tasks},
        )  # fmt: skip
        return Schedule.start(optimizer, overlap)

    def run(self) -> None:
        """Evaluate until the budget is spent (journaled evaluations count), then re-score the best
        estimates on every search item (cheap fidelity modes).

        Jobs go to the executor as it has room, in a fixed order (anchor evidence, then candidates in
        round order, then re-scores); each result is journaled the moment it arrives; a round is told as
        soon as all of its candidates are journaled. What a job scores is a function of the journal only
        (never of which job finished first), so every executor and every resume run the same jobs."""
        schedule = self._schedule()
        self.optimizer_batch = schedule.batch
        self._journal.clear()  # filled in place: the fidelity mode holds the same dicts
        self._journal.update({(c.generation, c.idx): c for c in self.store.candidates()})
        self._scores.clear()
        self._scores.update({s.owner: s for s in self.store.scores()})
        self._best = self.store.best()
        self._failed_this_run = 0
        if self.reporter:
            self.reporter.start(len(self._journal), self.budget, _marked(self._best))
        in_flight: dict[tuple, tuple[list[float] | None, dict | None, float]] = {}
        while True:
            self.mode.settle(schedule.rounds)
            while self._round_complete(schedule, self._journal):
                generation = schedule.told + 1
                schedule.tell(
                    self.mode.feedback([self._journal[(generation, i)] for i in range(schedule.batch)])
                )
            for job, genome in self._ready(schedule, in_flight):
                if self._executor is None:
                    self._warn_round_size(schedule.batch)
                if len(in_flight) >= self.executor.capacity:
                    break
                in_flight[job.key] = (genome, job.recipe, time.time())
                self.executor.submit(job)
            if not in_flight:
                return
            for job, outcome in self.executor.wait():
                self._land(job, *in_flight.pop(job.key), _finite(outcome))

    # -- what runs next --------------------------------------------------------------------------------

    def _ready(self, schedule: Schedule, in_flight: dict):
        """(job, genome) pairs that can run now and are not running, in the order they should start."""
        yield from self.mode.before_candidates(in_flight)
        for key, genome in self._waiting(schedule, self._journal):
            job = self.mode.candidate_job(key, self.recipe(genome, *key))
            if job is not None and job.key not in in_flight:
                yield job, [float(x) for x in genome]
        if len(self._journal) >= self.budget:
            yield from rescore_jobs(self.mode.rescore_targets(), in_flight)

    def _waiting(self, schedule: Schedule, journal: dict):
        """Asked candidates within the budget that are not journaled, in round order."""
        batch = schedule.batch
        for generation in sorted(schedule.rounds):
            for idx, genome in enumerate(schedule.rounds[generation]):
                key = (generation, idx)
                if generation * batch + idx >= self.budget:
                    return
                known = journal.get(key)
                if known is not None:
                    self._check_replay(key, known, genome)
                    continue
                yield key, genome

    def _round_size(self, generation: int) -> int:
        """Candidates of the round within the budget (the last round may be cut short)."""
        batch = self.optimizer_batch
        return max(0, min(batch, self.budget - generation * batch))

    # -- journaling ------------------------------------------------------------------------------------

    def _land(self, job: Job, genome, recipe, started: float, outcome: Outcome) -> None:
        kind = job.key[0]
        if kind == "cand":
            _, generation, idx = job.key
            outcome, fitness, metrics, fidelity = self.mode.landed(job, outcome)
            self._add(generation, idx, genome, recipe, started, outcome, fitness, metrics, fidelity)
            return
        name = owner(job.key)
        score = Score(
            name, "ok" if outcome.ok else "failed", outcome.reason,
            outcome.fitness if outcome.ok else -math.inf, outcome.metrics, outcome.item_evals,
            outcome.merge_seconds + outcome.eval_seconds, time.time(),
        )  # fmt: skip
        self.store.record_score(score, outcome.items if outcome.ok else None)
        self._scores[name] = score
        self.mode.scored(job, outcome)
        state = f"{outcome.fitness:.4f}" if outcome.ok else f"failed ({outcome.reason})"
        log.info("%s on %d items: %s", name, outcome.item_evals, state)

    def _add(
        self, generation: int, idx: int, genome, recipe, started: float, outcome: Outcome, fitness: float,
        metrics: dict, fidelity: dict, merge_seconds: float | None = None, eval_seconds: float | None = None,
    ) -> Candidate:  # fmt: skip
        candidate = Candidate(
            None, generation, idx, genome, recipe, "ok" if outcome.ok else "failed", outcome.reason,
            fitness if outcome.ok else -math.inf, metrics, outcome.merge_seconds if merge_seconds is None
            else merge_seconds, outcome.eval_seconds if eval_seconds is None else eval_seconds, started,
            time.time(), fidelity,
        )  # fmt: skip
        candidate.id = self.store.record(candidate, outcome.items if outcome.ok else None)
        self._journal[(generation, idx)] = candidate
        what = "fitness" if fidelity.get("full") else "estimate"
        if outcome.ok:
            log.info(
                "candidate %d.%d %s %.4f on %d item-evaluations (merge %.2fs, eval %.2fs)", generation, idx,
                what, candidate.fitness, fidelity["items"], candidate.merge_seconds, candidate.eval_seconds,
            )  # fmt: skip
        else:
            log.warning("candidate %d.%d failed: %s", generation, idx, outcome.reason)
        if candidate.ok and (self._best is None or candidate.fitness > self._best.fitness):
            self._best = candidate
        done = len(self._journal)
        self._check_failures(candidate)
        if self.reporter:
            self.reporter.evaluated(candidate, done, _marked(self._best), self._item_evals())
        return candidate

    def _item_evals(self) -> int:
        """Item-evaluations the search has paid for so far (candidates, anchor evidence, re-scores)."""
        return item_evaluations(self._journal.values(), self._scores.values())

    def _warn_round_size(self, batch: int) -> None:
        workers = self.executor.capacity
        if workers > 1 and 3 * workers > batch:
            log.warning(
                "%d workers share rounds of %d candidates: at least 3 per worker keep them busy through a "
                "round's slowest candidates (raise optimizer.popsize or batch)",
                workers,
                batch,
            )

    def _round_complete(self, schedule: Schedule, journal: dict) -> bool:
        generation = schedule.told + 1
        genomes = schedule.rounds.get(generation, [])
        if len(genomes) != schedule.batch or not all((generation, i) in journal for i in range(len(genomes))):
            return False
        for idx, genome in enumerate(genomes):
            self._check_replay((generation, idx), journal[(generation, idx)], genome)
        return True

    def _check_replay(self, key: tuple[int, int], known: Candidate, genome: np.ndarray) -> None:
        stored = np.asarray(known.genome, dtype=float)
        if stored.shape != genome.shape or not np.allclose(stored, genome, rtol=0, atol=1e-12):
            raise UserError(
                f"{self.store.dir}: replaying the journal does not reproduce candidate {key[0]}.{key[1]} "
                "(was the database edited, or made by another evomerge version?); "
                "start over with --fresh --force"
            )

    def _check_failures(self, candidate: Candidate) -> None:
        """Stop a broken setup: when no candidate of the experiment has succeeded and this run's first
        `stop_after_failures` evaluations all failed. Counted per run, so a resumed run stops as soon (it
        used to see the guard as passed and burn the budget), and one resumed after a fix gets its tries."""
        self._failed_this_run = 0 if candidate.ok else self._failed_this_run + 1
        limit = self.config.runtime.stop_after_failures
        if self._best is None and self._failed_this_run >= limit:
            raise UserError(
                f"the {'first ' if len(self._journal) == limit else 'last '}{limit} candidates all failed and "
                f"none has succeeded, stopping (last reason: {candidate.reason}); the journal is in {self.store.dir}"
            )

    # -- finals --------------------------------------------------------------------------------------

    def finish(self) -> list[Final]:
        """Score the best recipe, each parent and the default merges on the held-out split (once each)."""
        return self.finals.run()


def _marked(best: Candidate | None) -> str | None:
    """The best fitness so far as people see it: an estimate marked `~`, as reports mark it."""
    if best is None:
        return None
    return f"~{best.fitness:.4f}" if best.estimate else f"{best.fitness:.4f}"


def _finite(outcome: Outcome) -> Outcome:
    """A result whose fitness is not a finite number is a failed candidate, whatever produced it."""
    if outcome.ok and not (isinstance(outcome.fitness, (int, float)) and math.isfinite(outcome.fitness)):
        return Outcome(
            False,
            -math.inf,
            outcome.metrics,
            f"non-finite fitness ({outcome.fitness})",
            outcome.merge_seconds,
            outcome.eval_seconds,
            item_evals=outcome.item_evals,
        )  # fmt: skip (no items: a failed evaluation has none worth pairing)
    return outcome
