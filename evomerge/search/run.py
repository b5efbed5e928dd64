"""`evomerge search`: evolve recipes, journal every evaluation, resume exactly, score the finalists.

The optimizer asks rounds (see `Schedule` for how they overlap); candidates go to an executor (one local
worker, or Ray actors) as it has room, each result is journaled the moment it arrives, and a round is
told once all of it is journaled. Nothing of the optimizer is saved: resuming builds it afresh from the
config and replays the journal (every complete round told its journaled losses, every asked candidate
checked against the journaled genome), then evaluates only the missing candidates, so a run killed any
number of times ends exactly where the uninterrupted run ends, and an experiment directory holds only
data.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from evomerge.config import ExperimentConfig, source_labels
from evomerge.errors import UserError
from evomerge.merge.methods import Method
from evomerge.merge.recipe import Recipe
from evomerge.runtime.executor import make_executor
from evomerge.runtime.jobs import Executor, Job, Outcome, WorkerFactory
from evomerge.search.dfs_space import DfsSpace
from evomerge.search.fidelity import Anchors, ItemPlan
from evomerge.search.optimizers import Optimizer, make_optimizer, round_size
from evomerge.search.space import Space, default_params
from evomerge.store import (
    Candidate,
    ExperimentStore,
    Final,
    ItemResults,
    Score,
    item_evaluations,
    rescore_owner,
)

log = logging.getLogger("evomerge.search")
FAILED_LOSS = 1e9  # what the optimizer is told for a failed candidate: worse than any real loss


class Reporter(Protocol):
    """Where the loop reports progress (a rich bar on a terminal, log lines otherwise)."""

    def start(self, done: int, budget: int, best: str | None) -> None: ...

    def evaluated(self, candidate: Candidate, done: int, best: str | None, item_evals: int = 0) -> None: ...

    def stage(self, text: str) -> None: ...

    def note(self, text: str) -> None: ...


def candidate_seed(seed: int, generation: int, idx: int) -> int:
    """The seed of a candidate's random choices (DARE masks): a function of its place in the run only."""
    digest = hashlib.blake2b(f"{seed}:{generation}:{idx}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class Schedule:
    """The optimizer with the rounds it has asked and not yet been told. Never saved: a resumed run starts
    a new one and replays the journal through it (the asks and tells below are a pure function of the
    config and the journaled losses).

    The generation barrier: CMA-ES updates once per generation, so a generation's last, slow candidates
    would leave every other worker idle. The schedule therefore asks the first `overlap` candidates of
    the next round *before* it tells the current one (sampled from the current distribution; the rest of
    the round is asked after the tell). While round g's stragglers run, freed workers take round g+1's
    early candidates; with rounds of at least 3 candidates per worker they stayed over 90% busy in
    experiments/bench_ray.py, against about 80% with one round in flight. The order of asks and tells
    is fixed (ask round g+1's rest, ask round g+2's first `overlap`, tell round g+1, ...) and does not
    depend on which evaluation finishes first, so every executor and any number of workers run exactly
    the same candidates, and a resumed run continues the same trajectory. Telling CMA-ES a few samples
    drawn one update earlier did not slow it on test functions (ellipsoid, Rastrigin, noisy sphere).
    """

    optimizer: Optimizer
    overlap: int
    told: int = -1  # the last round told
    rounds: dict[int, list[np.ndarray]] = field(default_factory=dict)  # asked, not told, by round

    @classmethod
    def start(cls, optimizer: Optimizer, overlap: int) -> Schedule:
        schedule = cls(optimizer, overlap)
        schedule.rounds[0] = optimizer.ask(optimizer.batch)
        schedule.rounds[1] = optimizer.ask(overlap)
        return schedule

    @property
    def batch(self) -> int:
        return self.optimizer.batch

    def tell(self, losses: list[float]) -> None:
        """Tell the oldest round, then ask the rest of the next one and the first of the one after."""
        generation = self.told + 1
        self.optimizer.tell(self.rounds.pop(generation), losses)
        self.told = generation
        upcoming = self.rounds.setdefault(generation + 1, [])
        upcoming += self.optimizer.ask(self.batch - len(upcoming))
        self.rounds[generation + 2] = self.optimizer.ask(self.overlap)


def resolve_overlap(spec, batch: int) -> int:
    overlap = batch // 2 if spec.overlap is None else spec.overlap
    if overlap > batch:
        raise UserError(f"optimizer.overlap ({overlap}) exceeds the round size ({batch})")
    return overlap


class Search:
    def __init__(
        self,
        config: ExperimentConfig,
        config_dir: Path | None,
        store: ExperimentStore,
        reporter: Reporter | None = None,
        worker_factory: WorkerFactory | None = None,
    ) -> None:
        from evomerge.evaluate.tasks import task_manager
        from evomerge.models.loading import open_models

        self.config, self.config_dir, self.store, self.reporter = config, config_dir, store, reporter
        self.budget = config.optimizer.budget
        # cheap checks first: tasks exist, models exist and fit together (headers only)
        self.manager = task_manager(
            [t.name for t in config.evaluation.tasks], config.evaluation.include_paths
        )
        base, sources, _ = open_models(config, config_dir)
        self.num_layers = (base or sources[0]).num_layers
        self.source_names = source_labels(config.models.sources)
        if config.dfs is not None:
            self.space = DfsSpace(config.dfs, [s.num_layers for s in sources])
        else:
            self.space = Space(
                config.space, config.merge.method, len(sources), self.num_layers, seed=config.optimizer.seed
            )
        self.worker_factory = worker_factory
        self._executor: Executor | None = None
        self.fidelity = config.evaluation.fidelity
        self.plan: ItemPlan | None = None
        if self.fidelity.mode != "full":
            from evomerge.evaluate.evaluator import search_items

            search = search_items(config.evaluation, self.manager)
            self.plan = ItemPlan(self.fidelity, config.evaluation.tasks, search, config.evaluation.split.seed)
        self._journal: dict[tuple[int, int], Candidate] = {}
        self._scores: dict[str, Score] = {}
        self._rung_values: dict[tuple[int, int, int], dict[str, dict[int, float]]] = {}
        self._anchor_sets: dict[int, Anchors] = {}
        self._races: dict[int, tuple[int, dict[int, list[int]]]] = {}  # round -> (rungs journaled, race)
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

    def _stage(self, text: str) -> None:
        log.info(text)
        if self.reporter:
            self.reporter.stage(text)

    def recipe(self, genome: np.ndarray, generation: int, idx: int) -> dict:
        """The candidate's recipe as plain data (what the journal stores and the worker takes)."""
        if isinstance(self.space, DfsSpace):
            return self.space.decode(genome).to_dict()
        seed = candidate_seed(self.config.optimizer.seed, generation, idx)
        recipe = self.space.decode(
            genome, seed=seed, normalize=self.config.merge.normalize, rescale=self.config.merge.rescale
        )
        return recipe.to_dict()

    def _schedule(self) -> Schedule:
        """A new schedule; `run` replays the journal through it (a resumed run continues exactly)."""
        spec, popsize = self.config.optimizer, self.space.default_popsize()
        overlap = resolve_overlap(spec, round_size(spec, popsize))
        optimizer = make_optimizer(spec, self.space.start(), popsize, overlap)
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
        self._journal = {(c.generation, c.idx): c for c in self.store.candidates()}
        self._scores = {s.owner: s for s in self.store.scores()}
        self._best = self.store.best()
        self._failed_this_run = 0
        if self.reporter:
            self.reporter.start(len(self._journal), self.budget, _marked(self._best))
        in_flight: dict[tuple, tuple[list[float] | None, dict | None, float]] = {}
        while True:
            if self.fidelity.mode == "racing":
                self._settle_races(schedule)
            while self._round_complete(schedule, self._journal):
                generation = schedule.told + 1
                schedule.tell(self._losses([self._journal[(generation, i)] for i in range(schedule.batch)]))
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
        if self.fidelity.mode == "anchors":
            for name, recipe, source in self._baselines():
                if f"prior:{name}" not in self._scores and ("prior", name) not in in_flight:
                    yield Job(("prior", name), "search", recipe=recipe, source=source), None
            yield from _rescore_jobs(self._refresh_targets(), in_flight)
        for key, genome in self._waiting(schedule, self._journal):
            job = self._candidate_job(key, genome)
            if job is not None and job.key not in in_flight:
                yield job, [float(x) for x in genome]
        if len(self._journal) >= self.budget:
            yield from _rescore_jobs(self._rescore_targets(), in_flight)

    def _candidate_job(self, key: tuple[int, int], genome: np.ndarray) -> Job | None:
        """The job that scores the candidate next, or None while what it needs is not journaled yet."""
        generation, idx = key
        recipe = self.recipe(genome, generation, idx)
        mode = self.fidelity.mode
        if mode == "full":
            return Job(("cand", generation, idx), "search", recipe=recipe)
        if mode == "subsample":
            return Job(
                ("cand", generation, idx), "search", recipe=recipe, items=self.plan.subsample(generation)
            )
        if mode == "anchors":
            anchors = self._anchors(generation)
            if anchors is None:
                return None
            return Job(("cand", generation, idx), "search", recipe=recipe, items=anchors.items)
        rung = self._next_rung(generation, idx)
        if rung is None:
            return None
        items = self.plan.rung_items(generation, rung)
        return Job(("rung", generation, idx, rung), "search", recipe=recipe, items=items)

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
            fitness, metrics, fidelity = outcome.fitness, outcome.metrics, {"items": outcome.item_evals}
            fidelity["full"] = job.items is None or self.plan.is_full(_values(outcome.items))
            if outcome.ok and self.fidelity.mode == "anchors":
                fidelity["anchors"] = self.plan.anchor_version(generation)
                try:
                    fitness, estimates = self.plan.anchor_estimate(
                        self._anchors(generation), _values(outcome.items)
                    )
                except KeyError as exc:
                    outcome = replace(outcome, ok=False, reason=f"no per-item result for {exc}")
                else:
                    metrics = {"estimate": estimates, "anchors": outcome.metrics}
            self._add(generation, idx, genome, recipe, started, outcome, fitness, metrics, fidelity)
            return
        owner = _owner(job.key)
        score = Score(
            owner, "ok" if outcome.ok else "failed", outcome.reason,
            outcome.fitness if outcome.ok else -math.inf, outcome.metrics, outcome.item_evals,
            outcome.merge_seconds + outcome.eval_seconds, time.time(),
        )  # fmt: skip
        self.store.record_score(score, outcome.items if outcome.ok else None)
        self._scores[owner] = score
        if kind == "rung":
            self._rung_values[job.key[1:]] = _values(outcome.items) if outcome.ok else {}
        state = f"{outcome.fitness:.4f}" if outcome.ok else f"failed ({outcome.reason})"
        log.info("%s on %d items: %s", owner, outcome.item_evals, state)

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

    # -- what the optimizer is told --------------------------------------------------------------------

    def _losses(self, results: list[Candidate]) -> list[float]:
        """Minus each candidate's fitness (an estimate under a cheap fidelity). Racing keeps the race's
        order: a candidate that stopped at an earlier rung is placed below every one that went further
        (its loss is raised by the spread of the round's estimates per rung it missed)."""
        losses = [-c.fitness if c.ok else FAILED_LOSS for c in results]
        if self.fidelity.mode != "racing":
            return losses
        ok = [c.fitness for c in results if c.ok]
        spread = (max(ok) - min(ok) + 1.0) if ok else 1.0
        last = max((c.fidelity or {}).get("rung", 0) for c in results)
        return [
            loss + (last - (c.fidelity or {}).get("rung", 0)) * spread if c.ok else loss
            for loss, c in zip(losses, results, strict=True)
        ]

    # -- racing ----------------------------------------------------------------------------------------

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
        journaled = sum(1 for owner in self._scores if owner.startswith(prefix))
        cached = self._races.get(generation)
        if cached is None or cached[0] != journaled:
            self._races[generation] = (journaled, self._run_race(generation))
        return self._races[generation][1]

    def _run_race(self, generation: int) -> dict[int, list[int]]:
        racers = list(range(self._round_size(generation)))
        out = {0: racers}
        for rung in range(len(self.plan.rung_sizes()) - 1):
            keys = [_rung_owner(generation, i, rung) for i in racers]
            if not racers or not all(k in self._scores for k in keys):
                break
            ranked = sorted(
                (i for i, k in zip(racers, keys, strict=True) if self._scores[k].ok),
                key=lambda i: (-self.plan.mean_estimate(self._values_through(generation, i, rung))[0], i),
            )
            racers = sorted(ranked[: math.ceil(len(racers) / self.fidelity.eta)])
            # a racer journaled as stopped at this rung stays stopped: only a raised budget, which adds
            # racers to a round that was cut short, can make the race pick it again
            racers = [i for i in racers if not self._stopped_at(generation, i, rung)]
            out[rung + 1] = racers
        return out

    def _rungs_done(self, generation: int, idx: int) -> int | None:
        """The last rung the candidate has journaled, or None before its first."""
        done = [
            k for k in range(len(self.plan.rung_sizes())) if _rung_owner(generation, idx, k) in self._scores
        ]
        return max(done) if done else None

    def _stopped_at(self, generation: int, idx: int, rung: int) -> bool:
        known = self._journal.get((generation, idx))
        return known is not None and (known.fidelity or {}).get("rung") == rung

    def _values_through(self, generation: int, idx: int, rung: int) -> dict[str, dict[int, float]]:
        """The candidate's per-item values from rungs 0..rung together."""
        merged: dict[str, dict[int, float]] = {}
        for k in range(rung + 1):
            key = (generation, idx, k)
            if key not in self._rung_values:
                self._rung_values[key] = _stored_values(self.store.items(_rung_owner(generation, idx, k)))
            for task, values in self._rung_values[key].items():
                merged.setdefault(task, {}).update(values)
        return merged

    def _settle_races(self, schedule: Schedule) -> None:
        """Journal every candidate whose race is over: failed at a rung, stopped by the race, or through
        the last rung. Its row holds the estimate on all the items it reached."""
        last = len(self.plan.rung_sizes()) - 1
        for generation, genomes in sorted(schedule.rounds.items()):
            size = self._round_size(generation)
            if size == 0 or all((generation, i) in self._journal for i in range(size)):
                continue
            race = self._race(generation)
            for idx in range(min(size, len(genomes))):
                if (generation, idx) in self._journal:
                    continue
                rung = self._rungs_done(generation, idx)
                if rung is None:
                    continue
                score = self._scores[_rung_owner(generation, idx, rung)]
                stopped = rung + 1 in race and idx not in race[rung + 1]
                if score.ok and rung < last and not stopped:
                    continue
                self._add_racer(generation, idx, genomes[idx], rung, score.ok)

    def _add_racer(self, generation: int, idx: int, genome: np.ndarray, rung: int, ok: bool) -> None:
        owners = [_rung_owner(generation, idx, k) for k in range(rung + 1)]
        scores = [self._scores[o] for o in owners]
        values = self._values_through(generation, idx, rung)
        fitness, estimates = self.plan.mean_estimate(values)
        # the metric that makes each task's fitness: the same in every rung (rung 0 scores every task)
        metric = {task: r.metric for task, r in self.store.items(owners[0]).items()}
        per_item = {
            task: {"metric": metric[task], "ids": sorted(v), "values": [v[i] for i in sorted(v)]}
            for task, v in values.items()
        }
        metrics = {task: {metric[task]: value} for task, value in estimates.items()}
        outcome = Outcome(ok, fitness, metrics, scores[-1].reason, 0.0, 0.0, per_item if ok else {})
        fidelity = {
            "items": sum(s.item_evals for s in scores), "full": self.plan.is_full(values), "rung": rung,
        }  # fmt: skip
        started = min(s.finished_at - s.seconds for s in scores)
        self._add(
            generation, idx, [float(x) for x in genome], self.recipe(genome, generation, idx), started, outcome,
            fitness, metrics, fidelity, merge_seconds=0.0, eval_seconds=sum(s.seconds for s in scores),
        )  # fmt: skip

    # -- anchors and re-scores -------------------------------------------------------------------------

    def _baselines(self) -> list[tuple[str, dict | None, int | None]]:
        """(name, recipe, source) of the parents and default merges: the finals' baselines."""
        jobs = [(f"parent {label}", None, i) for i, label in enumerate(self.source_names)]
        if self.config.dfs is not None:
            return jobs
        method = self.config.merge.method
        methods = [method] + [m for m in self._default_methods() if m is not method]
        return jobs + [(f"default {m.value}", self._default_recipe(m), None) for m in methods]

    def _round_best(self, generation: int) -> Candidate | None:
        """The round's best candidate by the fitness the search saw, once the whole round is journaled."""
        size = self._round_size(generation)
        results = [self._journal.get((generation, i)) for i in range(size)]
        if size == 0 or any(c is None for c in results):
            return None
        ok = [c for c in results if c.ok]
        return max(ok, key=lambda c: (c.fitness, -c.idx)) if ok else None

    def _refresh_targets(self) -> list[Candidate]:
        rounds = {g for g, _ in self._journal}
        out = []
        for generation in sorted(rounds):
            if self.plan.is_refresh_round(generation):
                best = self._round_best(generation)
                if best is not None and rescore_owner(best) not in self._scores:
                    out.append(best)
        return out

    def _anchors(self, generation: int):
        """The anchors round `generation` is scored on, or None while their evidence is not journaled."""
        version = self.plan.anchor_version(generation)
        if version in self._anchor_sets:
            return self._anchor_sets[version]
        owners = [f"prior:{name}" for name, _, _ in self._baselines()]
        for refresh_round in self.plan.refresh_rounds(version):
            size = self._round_size(refresh_round)
            if size == 0:
                continue
            best = self._round_best(refresh_round)
            if best is None and any((refresh_round, i) not in self._journal for i in range(size)):
                return None
            if best is not None:
                owners.append(rescore_owner(best))
        if not all(o in self._scores for o in owners):
            return None
        evidence = [_stored_values(self.store.items(o)) for o in owners if self._scores[o].ok]
        anchors = self.plan.choose_anchors(evidence, version)
        self._anchor_sets[version] = anchors
        log.info(
            "anchors v%d: %s from %d models",
            version,
            {t: len(i) for t, i in anchors.items.items()},
            len(evidence),
        )
        return anchors

    def _rescore_targets(self) -> list[Candidate]:
        """The best `rescore_top` candidates by estimate that have no fitness on every search item yet."""
        if self.fidelity.mode == "full":
            return []
        ranked = sorted(
            (c for c in self._journal.values() if c.ok), key=lambda c: (-c.fitness, c.generation, c.idx)
        )
        top = ranked[: self.fidelity.rescore_top]
        return [c for c in top if c.estimate and rescore_owner(c) not in self._scores]

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
        best = self.store.winner()
        if best is None:
            raise UserError(f"no candidate succeeded; see {self.store.dir / 'search.log'}")
        have = {f.name: f for f in self.store.finals()}
        if "evolved" in have and have["evolved"].candidate_id != best.id:
            self.store.clear_finals("evolved")  # a resumed, longer run found a better recipe
            have.pop("evolved")
        jobs = [("evolved", "evolved", best.id, best.recipe)]
        if self.config.dfs is not None:  # DFS merges no weights: the baselines are the sources themselves
            jobs += [(f"parent {label}", "parent", i, None) for i, label in enumerate(self.source_names)]
            return self._run_finals(jobs, have)
        method = self.config.merge.method
        methods = [method] + [m for m in self._default_methods() if m is not method]
        jobs.append((f"default {method.value}", "default", None, self._default_recipe(method)))
        jobs += [(f"parent {label}", "parent", i, None) for i, label in enumerate(self.source_names)]
        jobs += [(f"default {m.value}", "default", None, self._default_recipe(m)) for m in methods[1:]]
        return self._run_finals(jobs, have)

    def _run_finals(self, jobs: list, have: dict) -> list[Final]:
        todo = [job for job in jobs if job[0] not in have]
        by_name = {job[0]: job for job in todo}
        running = 0
        while todo or running:
            while todo and running < self.executor.capacity:
                name, kind, ref, recipe = todo.pop(0)
                self._stage(f"held-out: {name}")
                source = ref if kind == "parent" else None
                self.executor.submit(Job(name, "heldout", recipe=recipe, source=source))
                running += 1
            for job, outcome in self.executor.wait():
                running -= 1
                outcome = _finite(outcome)
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

    def _default_methods(self) -> list[Method]:
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

    def _default_recipe(self, method: Method) -> dict:
        params = default_params(method, len(self.source_names))
        groups = {g: params for g in self.space.all_groups}
        return Recipe(method, groups, seed=candidate_seed(self.config.optimizer.seed, -1, 0)).to_dict()


def _rescore_jobs(candidates: list[Candidate], in_flight: dict):
    """Jobs re-scoring each candidate on every search item, unless already running."""
    for c in candidates:
        key = ("rescore", c.generation, c.idx)
        if key not in in_flight:
            yield Job(key, "search", recipe=c.recipe), None


def _rung_owner(generation: int, idx: int, rung: int) -> str:
    return _owner(("rung", generation, idx, rung))


def _owner(key: tuple) -> str:
    """The journal's name of a job that is not a candidate's own evaluation."""
    kind, *rest = key
    return f"{kind}:" + ".".join(map(str, rest))


def _values(items: dict[str, dict]) -> dict[str, dict[int, float]]:
    """An outcome's per-item results as {task: {item id: value}}."""
    return {
        task: dict(zip((int(i) for i in d["ids"]), (float(v) for v in d["values"]), strict=True))
        for task, d in items.items()
    }


def _stored_values(items: dict[str, ItemResults]) -> dict[str, dict[int, float]]:
    return {task: dict(zip(r.ids.tolist(), r.values.tolist(), strict=True)) for task, r in items.items()}


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
