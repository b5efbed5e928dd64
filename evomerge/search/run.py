"""`evomerge search`: evolve recipes, journal every evaluation, resume exactly, score the finalists.

The loop is generation by generation: the optimizer asks a round, each candidate is decoded, merged and
scored by the worker and journaled at once, and the round is told. Resuming loads the optimizer state
saved after the last tell and asks the next round again; being seeded, it asks the same genomes, so the
candidates already in the journal are taken from it and only the missing ones are evaluated. A run
killed any number of times therefore ends exactly where the uninterrupted run ends.
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
from evomerge.search.dfs_space import DfsSpace
from evomerge.search.optimizers import dump_state, load_state, make_optimizer
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


class Search:
    def __init__(
        self,
        config: ExperimentConfig,
        config_dir: Path | None,
        store: ExperimentStore,
        reporter: Reporter | None = None,
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
        self._worker = None

    @property
    def worker(self):
        """Loaded on first use: a finished experiment reopened only to print its results loads no model."""
        if self._worker is None:
            from evomerge.runtime.worker import DfsWorker, Worker

            self._stage("loading models")
            kind = DfsWorker if self.config.dfs is not None else Worker
            self._worker = kind(self.config, self.config_dir, self.manager)
            log.info("models resident in %.1fs; %d genes", self._worker.load_seconds, self.space.size)
        return self._worker

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

    def run(self) -> None:
        """Evaluate until the budget is spent (journaled evaluations count)."""
        saved = self.store.optimizer()
        if saved is not None:
            generation, blob = saved[0] + 1, saved[1]
            optimizer = load_state(blob)
        else:
            generation = 0
            optimizer = make_optimizer(
                self.config.optimizer, self.space.start(), self.space.default_popsize()
            )
        batch = optimizer.batch
        done = self.store.count()
        best = self.store.best()
        if self.reporter:
            self.reporter.start(done, self.budget, best.fitness if best else None)
        while generation * batch < self.budget:
            genomes = optimizer.ask()
            journal = {c.idx: c for c in self.store.candidates(generation)}
            results: list[Candidate] = []
            for idx, genome in enumerate(genomes):
                if idx in journal:
                    known = journal[idx]
                    if not np.allclose(known.genome, genome, rtol=0, atol=1e-12):
                        raise UserError(
                            f"{self.store.dir}: the optimizer's state does not reproduce candidate {generation}.{idx} "
                            "of the journal (was the database edited?); start over with --fresh --force"
                        )
                    results.append(known)
                    continue
                if generation * batch + idx >= self.budget:
                    break
                candidate = self._evaluate(genome, generation, idx)
                results.append(candidate)
                done += 1
                if candidate.ok and (best is None or candidate.fitness > best.fitness):
                    best = candidate
                self._check_failures(done)
                if self.reporter:
                    self.reporter.evaluated(candidate, done, best.fitness if best else None)
            if len(results) < len(genomes):
                break  # the budget ends inside this round: it is told when a larger budget completes it
            optimizer.tell(genomes, [-c.fitness if c.ok else FAILED_LOSS for c in results])
            self.store.save_optimizer(generation, dump_state(optimizer))
            generation += 1

    def _evaluate(self, genome: np.ndarray, generation: int, idx: int) -> Candidate:
        recipe = self.recipe(genome, generation, idx)
        started = time.time()
        outcome = self.worker.evaluate(recipe, "search")
        candidate = Candidate(
            None, generation, idx, [float(x) for x in genome], recipe, "ok" if outcome.ok else "failed",
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
        for name, kind, ref, recipe in jobs:
            if name in have:
                continue
            self._stage(f"held-out: {name}")
            started = time.time()
            outcome = (
                self.worker.evaluate_source(ref, "heldout")
                if kind == "parent"
                else self.worker.evaluate(recipe, "heldout")
            )
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
                    time.time() - started,
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
    reporter: Reporter | None = None,
) -> list[SearchResult]:
    """One result per stage (one for a plain experiment)."""
    config, config_dir = load_config(config_path)
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
        search.run()
        done = store.count()
        finals = search.finish() if done >= config.optimizer.budget else []
        return SearchResult(out, done, config.optimizer.budget, store.best(), finals, resumed)
    finally:
        root.removeHandler(handler)
        handler.close()
        store.close()
