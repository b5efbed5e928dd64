"""`evomerge search`: evolve recipes, journal every evaluation, resume exactly, score the finalists.

The optimizer asks rounds (see `Schedule` for how they overlap); candidates go to an executor (one local
worker, or Ray actors) as it has room, each result is journaled the moment it arrives, and a round is
told once all of it is journaled. The schedule (optimizer + asked rounds) is saved after every tell.
Resuming loads it, takes the candidates already in the journal from the journal and evaluates only the
missing ones, so a run killed any number of times ends exactly where the uninterrupted run ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import yaml

from evomerge.config import ExperimentConfig, describe_changes, load_config, source_labels
from evomerge.errors import UserError
from evomerge.merge.methods import Method
from evomerge.merge.recipe import Recipe
from evomerge.runtime.executor import Executor, Job, WorkerFactory, make_executor
from evomerge.runtime.worker import Outcome
from evomerge.search.dfs_space import DfsSpace
from evomerge.search.optimizers import Optimizer, dump_state, load_state, make_optimizer, round_size
from evomerge.search.space import Space, default_params
from evomerge.store import Candidate, ExperimentStore, Final

log = logging.getLogger("evomerge.search")
FAILED_LOSS = 1e9  # what the optimizer is told for a failed candidate: worse than any real loss


class Reporter(Protocol):
    """Where the loop reports progress (a rich bar on a terminal, log lines otherwise)."""

    def start(self, done: int, budget: int, best: float | None) -> None: ...

    def evaluated(self, candidate: Candidate, done: int, best: float | None) -> None: ...

    def stage(self, text: str) -> None: ...


@dataclass
class SearchResult:
    dir: Path
    evaluations: int
    budget: int
    best: Candidate | None
    finals: list[Final] = field(default_factory=list)
    resumed: bool = False


def candidate_seed(seed: int, generation: int, idx: int) -> int:
    """The seed of a candidate's random choices (DARE masks): a function of its place in the run only."""
    digest = hashlib.blake2b(f"{seed}:{generation}:{idx}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def open_experiment(
    config: ExperimentConfig,
    config_text: str,
    out: Path,
    *,
    fresh: bool,
    force: bool,
    config_dir: Path | None = None,
) -> tuple[ExperimentStore, bool]:
    """The experiment store at `out`: created, or opened to resume after checking the config still matches."""
    identity = config.identity()
    snapshot = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    if ExperimentStore.exists(out) and not fresh:
        store = ExperimentStore.open(out)
        old = json.loads(store.meta("identity") or "{}")
        if _pruned(old) != _pruned(identity):
            changed = ", ".join(describe_changes(old, identity)) or "the config"
            store.close()
            raise UserError(
                f"{out} holds an experiment with a different config (changed: {changed}); "
                "resume with the original config, or start over with --fresh --force or another --out"
            )
        if store.meta("config") != snapshot:
            store.set_meta("config", snapshot)
        if config_dir is not None and store.meta("config_dir") != str(config_dir):
            store.set_meta("config_dir", str(config_dir))
        return store, True
    if fresh and ExperimentStore.exists(out) and not force:
        raise UserError(f"{out} holds an experiment; --fresh would delete it: add --force to confirm")
    if not fresh and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists, is not empty and is not an experiment; choose another --out")
    meta = {
        "identity": json.dumps(identity, sort_keys=True),
        "identity_hash": config.identity_hash(),
        "config": snapshot,
        "config_dir": str(config_dir or Path.cwd()),  # where relative model paths may resolve (export)
    }
    store = ExperimentStore.create(out, meta, config_text=config_text, replace=fresh)
    return store, False


@dataclass
class Schedule:
    """The optimizer with the rounds it has asked and not yet been told; saved whole after every tell.

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
        from evomerge.runtime.worker import open_models

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
            return self.space.decode(genome)
        seed = candidate_seed(self.config.optimizer.seed, generation, idx)
        recipe = self.space.decode(
            genome, seed=seed, normalize=self.config.merge.normalize, rescale=self.config.merge.rescale
        )
        return recipe.to_dict()

    def _schedule(self) -> Schedule:
        saved = self.store.optimizer()
        if saved is not None:
            schedule = load_state(saved[1])
            if not isinstance(schedule, Schedule):
                raise UserError(
                    f"{self.store.dir} was made by an older evomerge whose optimizer checkpoints this one "
                    "cannot continue; start over with --fresh --force"
                )
            return schedule
        spec, popsize = self.config.optimizer, self.space.default_popsize()
        overlap = resolve_overlap(spec, round_size(spec, popsize))
        optimizer = make_optimizer(spec, self.space.start(), popsize, overlap)
        return Schedule.start(optimizer, overlap)

    def run(self) -> None:
        """Evaluate until the budget is spent (journaled evaluations count).

        Candidates go to the executor as it has room, in round order; each result is journaled the
        moment it arrives; a round is told as soon as all of its candidates are journaled."""
        schedule = self._schedule()
        batch = schedule.batch
        journal = {(c.generation, c.idx): c for c in self.store.candidates()}
        done, best = len(journal), self.store.best()
        if self.reporter:
            self.reporter.start(done, self.budget, best.fitness if best else None)
        in_flight: dict[tuple[int, int], tuple[list[float], dict, float]] = {}
        while True:
            while self._round_complete(schedule, journal):
                generation = schedule.told + 1
                results = [journal[(generation, idx)] for idx in range(batch)]
                schedule.tell([-c.fitness if c.ok else FAILED_LOSS for c in results])
                self.store.save_optimizer(schedule.told, dump_state(schedule))
            for key, genome in self._waiting(schedule, journal, in_flight):
                if self._executor is None:
                    self._warn_round_size(batch)
                if len(in_flight) >= self.executor.capacity:
                    break
                recipe = self.recipe(genome, *key)
                in_flight[key] = ([float(x) for x in genome], recipe, time.time())
                self.executor.submit(Job(key, "search", recipe=recipe))
            if not in_flight:
                return
            for job, outcome in self.executor.wait():
                candidate = self._record(job.key, *in_flight.pop(job.key), outcome)
                journal[job.key] = candidate
                done += 1
                if candidate.ok and (best is None or candidate.fitness > best.fitness):
                    best = candidate
                self._check_failures(done)
                if self.reporter:
                    self.reporter.evaluated(candidate, done, best.fitness if best else None)

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
        return len(genomes) == schedule.batch and all((generation, i) in journal for i in range(len(genomes)))

    def _waiting(self, schedule: Schedule, journal: dict, in_flight: dict):
        """Asked candidates within the budget that are neither journaled nor running, in round order."""
        batch = schedule.batch
        for generation in sorted(schedule.rounds):
            for idx, genome in enumerate(schedule.rounds[generation]):
                key = (generation, idx)
                if generation * batch + idx >= self.budget:
                    return
                known = journal.get(key)
                if known is not None:
                    if not np.allclose(known.genome, genome, rtol=0, atol=1e-12):
                        raise UserError(
                            f"{self.store.dir}: the optimizer's state does not reproduce candidate "
                            f"{generation}.{idx} of the journal (was the database edited?); "
                            "start over with --fresh --force"
                        )
                    continue
                if key not in in_flight:
                    yield key, genome

    def _record(
        self, key: tuple[int, int], genome: list[float], recipe: dict, started: float, outcome: Outcome
    ) -> Candidate:
        generation, idx = key
        candidate = Candidate(
            None, generation, idx, genome, recipe, "ok" if outcome.ok else "failed",
            outcome.reason, outcome.fitness if outcome.ok else -math.inf, outcome.metrics,
            outcome.merge_seconds, outcome.eval_seconds, started, time.time(),
        )  # fmt: skip
        candidate.id = self.store.record(candidate)
        if outcome.ok:
            log.info(
                "candidate %d.%d fitness %.4f (merge %.2fs, eval %.2fs)",
                generation,
                idx,
                outcome.fitness,
                outcome.merge_seconds,
                outcome.eval_seconds,
            )
        else:
            log.warning("candidate %d.%d failed: %s", generation, idx, outcome.reason)
        return candidate

    def _check_failures(self, done: int) -> None:
        limit = self.config.runtime.stop_after_failures
        if done != limit:
            return
        journal = self.store.candidates()[:limit]
        if all(not c.ok for c in journal):
            raise UserError(
                f"the first {len(journal)} candidates all failed, stopping (last reason: {journal[-1].reason}); "
                f"the journal is in {self.store.dir}"
            )

    # -- finals --------------------------------------------------------------------------------------

    def finish(self) -> list[Final]:
        """Score the best recipe, each parent and the default merges on the held-out split (once each)."""
        best = self.store.best()
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
                    )  # fmt: skip
                )
                log.info(
                    "held-out %s: %s",
                    name,
                    f"{outcome.fitness:.4f}" if outcome.ok else f"failed ({outcome.reason})",
                )
        return self.store.finals()

    def _default_methods(self) -> list[Method]:
        if self.config.models.base is None:
            return [Method.linear]
        methods = [Method.task_arithmetic, Method.ties, Method.dare_ties]
        return methods + ([Method.slerp] if len(self.source_names) == 1 else [])

    def _default_recipe(self, method: Method) -> dict:
        params = default_params(method, len(self.source_names))
        groups = {g: params for g in self.space.all_groups}
        return Recipe(method, groups, seed=candidate_seed(self.config.optimizer.seed, -1, 0)).to_dict()


def _pruned(value):
    """Config dump without None entries: an optional key added to the schema later (default None) must
    not make older experiments look changed."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def run_search(
    config_path: str | Path,
    *,
    out: str | Path | None = None,
    fresh: bool = False,
    force: bool = False,
    budget: int | None = None,
    executor: str | None = None,
    workers: int | None = None,
    reporter: Reporter | None = None,
) -> list[SearchResult]:
    """One result per stage (one for a plain experiment). `executor` and `workers` override the runtime
    section (they change where candidates run, never which candidates run)."""
    config, config_dir = load_config(config_path)
    config = _override_runtime(config, executor, workers)
    out = Path(out if out is not None else config.output.dir)  # relative to the working directory
    if not config.stages:
        return [_run_one(config, config_dir, out, fresh, force, budget, reporter)]
    from evomerge.report.export import export_candidate

    if fresh and out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(
                f"{out} holds a staged experiment; --fresh would delete it: add --force to confirm"
            )
        if not all((child / "experiment.sqlite").is_file() for child in out.iterdir() if child.is_dir()):
            raise UserError(f"{out} is not a staged experiment directory; refusing to delete it")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    results, previous = [], None
    for index, stage in enumerate(config.stages):
        stage_config = config.stage_config(index, previous)
        result = _run_one(stage_config, config_dir, out / stage.name, False, False, budget, reporter)
        results.append(result)
        if not result.finals:
            break
        previous = (out / stage.name / f"{stage.name}-best").resolve()
        if not previous.exists():  # written once, atomically; a resumed run reuses it
            if reporter:
                reporter.stage(f"exporting the best of stage {stage.name}")
            export_candidate(out / stage.name, previous)
    return results


def _override_runtime(
    config: ExperimentConfig, executor: str | None, workers: int | None
) -> ExperimentConfig:
    if executor is None and workers is None:
        return config
    data = config.model_dump(mode="json")
    if executor is not None:
        data["runtime"]["executor"] = executor
    if workers is not None:
        if data["runtime"]["executor"] != "ray":
            raise UserError("--workers applies to the ray executor: add --executor ray")
        data["runtime"]["ray"]["workers"] = workers
    return ExperimentConfig.model_validate(data)


def _run_one(
    config: ExperimentConfig,
    config_dir: Path,
    out: Path,
    fresh: bool,
    force: bool,
    budget: int | None,
    reporter: Reporter | None,
) -> SearchResult:
    if budget is not None:
        config = config.model_copy(
            update={"optimizer": config.optimizer.model_copy(update={"budget": budget})}
        )
    store, resumed = open_experiment(
        config,
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        out,
        fresh=fresh,
        force=force,
        config_dir=config_dir,
    )
    handler = logging.FileHandler(out / "search.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("evomerge")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        log.info(
            "%s experiment %s (config %s)", "resuming" if resumed else "starting", out, config.identity_hash()
        )
        search = Search(config, config_dir, store, reporter)
        try:
            search.run()
            done = store.count()
            finals = search.finish() if done >= config.optimizer.budget else []
        finally:
            search.close()
        return SearchResult(out, done, config.optimizer.budget, store.best(), finals, resumed)
    finally:
        root.removeHandler(handler)
        handler.close()
        store.close()
