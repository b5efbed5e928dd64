"""Optimizers behind one ask/tell interface, over the unit box [0, 1]^n, minimising a loss.

A round is a CMA-ES generation (a batch for the others). Candidates may be asked in parts (the search
asks a few of the next round before it tells the current one) and each round is told whole, in the order
the rounds were asked. An optimizer is a deterministic function of its spec, its start point and the
losses it has been told: nothing of it is saved. A resumed run rebuilds it by replaying the journaled
losses (see `Schedule` in search/run.py), so an experiment directory holds only data, never a pickle,
and the resumed run continues on exactly the trajectory it would have followed. No adapter touches
global RNG state (lm-eval reseeds numpy's global generator; cma draws from it by default).
"""

from __future__ import annotations

import importlib.abc
import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from evomerge.config import CmaSpec, M2n2Spec, MapElitesSpec, NevergradSpec, OptunaSpec, RandomSpec
from evomerge.errors import UserError, first_line


@dataclass(frozen=True)
class Feedback:
    """What an optimizer is told of one candidate. `loss` is what single-objective optimizers minimise;
    `objectives` the candidate's objective vector (maximised; today its fitness alone), for multi-objective
    optimizers; `items` loads its per-item results, for optimizers that keep an archive and compare
    candidates item by item (resource competition). A plain float stands for Feedback(loss)."""

    loss: float
    objectives: tuple[float, ...] = ()
    items: Callable[[], Mapping[str, Any]] | None = None


def losses_of(told: Sequence[Feedback | float]) -> list[float]:
    return [t.loss if isinstance(t, Feedback) else float(t) for t in told]


class Optimizer(Protocol):
    batch: int

    def ask(self, n: int) -> list[np.ndarray]: ...

    def tell(self, genomes: list[np.ndarray], told: Sequence[Feedback | float]) -> None: ...


class _Refuse(importlib.abc.MetaPathFinder):
    """Fails the import of the named top-level packages (only while installed in sys.meta_path)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is not imported for cma")
        return None


def _import_cma():
    """cma, without the optional packages it imports at import time for what evomerge does not use:
    matplotlib.pyplot (cma.plot) and scipy.stats (its surrogate models' Kendall tau, which falls back to
    its own). They are a second of every search's start-up. Already imported, they are simply used."""
    import warnings

    if "cma" in sys.modules:
        return sys.modules["cma"]
    refuse = _Refuse(tuple(n for n in ("matplotlib", "scipy") if n not in sys.modules))
    sys.meta_path.insert(0, refuse)
    try:
        with warnings.catch_warnings():  # cma warns that cma.plot is unavailable
            warnings.simplefilter("ignore")
            import cma
    finally:
        sys.meta_path.remove(refuse)
    return cma


class CmaOptimizer:
    def __init__(self, spec: CmaSpec, x0: np.ndarray, popsize: int, overlap: int = 0) -> None:
        cma = _import_cma()
        self.rng = np.random.RandomState(spec.seed)
        self.batch = round_size(spec, popsize)
        options = {
            "bounds": [0.0, 1.0], "popsize": self.batch, "seed": spec.seed + 1,  # cma: seed 0 = from the clock
            "verbose": -9, "randn": self.rng.randn, "CMA_diagonal": False,
        }  # fmt: skip
        self.es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), spec.sigma0, options)

    def ask(self, n: int) -> list[np.ndarray]:
        return [np.asarray(x, dtype=float) for x in self.es.ask(n)] if n else []

    def tell(self, genomes: list[np.ndarray], told: Sequence[Feedback | float]) -> None:
        self.es.tell([list(g) for g in genomes], losses_of(told))


class NevergradOptimizer:
    def __init__(self, spec: NevergradSpec, x0: np.ndarray, batch: int, overlap: int = 0) -> None:
        import nevergrad as ng

        check_nevergrad_name(spec.optimizer)
        self.batch = round_size(spec, batch)
        param = ng.p.Array(init=np.asarray(x0, dtype=float)).set_mutation(sigma=1 / 6).set_bounds(0.0, 1.0)
        param.random_state = np.random.RandomState(spec.seed)
        self.opt = ng.optimizers.registry[spec.optimizer](
            parametrization=param, budget=spec.budget, num_workers=self.batch + overlap
        )
        self._pending: list = []  # asked, not yet told, in ask order

    def ask(self, n: int) -> list[np.ndarray]:
        asked = [self.opt.ask() for _ in range(n)]
        self._pending += asked
        return [np.asarray(c.value, dtype=float) for c in asked]

    def tell(self, genomes: list[np.ndarray], told: Sequence[Feedback | float]) -> None:
        asked, self._pending = self._pending[: len(genomes)], self._pending[len(genomes) :]
        for candidate, genome, loss in zip(asked, genomes, losses_of(told), strict=True):
            if not np.array_equal(np.asarray(candidate.value, dtype=float), genome):
                raise RuntimeError("nevergrad: rounds must be told in the order they were asked")
            self.opt.tell(candidate, loss)


class RandomOptimizer:
    def __init__(self, spec: RandomSpec, size: int, batch: int, overlap: int = 0) -> None:
        self.rng = np.random.RandomState(spec.seed)
        self.size, self.batch = size, round_size(spec, batch)

    def ask(self, n: int) -> list[np.ndarray]:
        return [self.rng.uniform(0.0, 1.0, self.size) for _ in range(n)]

    def tell(self, genomes: list[np.ndarray], told: Sequence[Feedback | float]) -> None:
        pass


def check_nevergrad_name(name: str) -> None:
    import nevergrad as ng

    if name not in ng.optimizers.registry:
        import difflib

        close = difflib.get_close_matches(name, list(ng.optimizers.registry), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"optimizer.optimizer: unknown nevergrad optimizer {name!r}{hint}")


def check_replayable(spec, size: int, default_batch: int, overlap: int) -> None:
    """Resuming rebuilds the optimizer by replaying its history, so it must be a pure function of what
    it was told: two instances told the same losses must ask the same candidates, and it must not run a
    helper thread (nevergrad's recast optimizers, e.g. COBYLA under NGOpt, do; such a thread also keeps the
    interpreter from exiting). Two rounds are probed on a fixed loss."""
    if not isinstance(spec, NevergradSpec):
        return  # cma and random are replayable by construction (their own seeded generators)
    x0 = np.full(size, 0.5)

    def probe() -> tuple[list[np.ndarray], NevergradOptimizer]:
        opt = NevergradOptimizer(spec, x0, default_batch, overlap)
        seen = []
        for _ in range(2):
            asked = opt.ask(opt.batch)
            seen += asked
            opt.tell(asked, [float(np.sum((x - 0.3) ** 2)) for x in asked])
        return seen, opt

    import warnings

    try:
        with warnings.catch_warnings():  # the trial's own warnings (scipy's COBYLA under NGOpt) are noise
            warnings.simplefilter("ignore")
            first, a = probe()
            threaded = _stop_threads(a)
            second, b = probe()
            threaded = _stop_threads(b) or threaded
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"optimizer.optimizer: nevergrad {spec.optimizer} failed a trial run "
            f"({type(exc).__name__}: {first_line(exc, 120)}); try CMA, TwoPointsDE, DE or PSO"
        ) from None
    if threaded:
        raise UserError(
            f"optimizer.optimizer: nevergrad {spec.optimizer} (as asked {spec.batch or default_batch} at a time) "
            "runs its search in a helper thread, so a run could not be resumed exactly; "
            "try CMA, TwoPointsDE, DE or PSO"
        )
    if len(first) != len(second) or not all(np.array_equal(x, y) for x, y in zip(first, second, strict=True)):
        raise UserError(
            f"optimizer.optimizer: nevergrad {spec.optimizer} is not deterministic for a fixed seed, so a run "
            "could not be resumed exactly; try CMA, TwoPointsDE, DE or PSO"
        )


def _stop_threads(optimizer: NevergradOptimizer) -> bool:
    """Stop the helper thread of nevergrad's recast optimizers (so the interpreter can exit); True when
    there was one."""
    found = False
    stack = [optimizer.opt]
    seen: set[int] = set()
    while stack:  # the recast optimizer may sit under a meta-optimizer (NGOpt -> ... -> COBYLA)
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        thread = getattr(current, "_messaging_thread", None)
        if thread is not None:
            found = True
            if hasattr(thread, "stop"):
                thread.stop()
        for attr in ("optim", "_optim", "optims"):
            child = getattr(current, attr, None)
            if isinstance(child, list):
                stack += child
            elif child is not None:
                stack.append(child)
    return found


def round_size(spec, default: int) -> int:
    """Candidates per round: cma's popsize, the others' batch, or the search space's default."""
    return (spec.popsize if isinstance(spec, CmaSpec) else spec.batch) or default


def make_optimizer(
    spec,
    x0: np.ndarray,
    default_batch: int,
    overlap: int = 0,
    objectives: int = 1,
    seeds: Sequence[np.ndarray] = (),
    weights: Mapping[str, float] | None = None,
) -> Optimizer:
    """`objectives`: the length of the objective vectors the optimizer is told (multi-objective ones use it);
    `seeds`: genomes an archive starts from (the sources alone, the default merge); `weights`: the tasks'."""
    if isinstance(spec, M2n2Spec):
        return M2n2Optimizer(spec, x0, default_batch, seeds, weights or {})
    if isinstance(spec, MapElitesSpec):
        return MapElitesOptimizer(spec, x0, default_batch, objectives)
    if isinstance(spec, OptunaSpec):
        return OptunaOptimizer(spec, len(x0), default_batch, objectives)
    if isinstance(spec, CmaSpec):
        return CmaOptimizer(spec, x0, default_batch, overlap)
    if isinstance(spec, NevergradSpec):
        return NevergradOptimizer(spec, x0, default_batch, overlap)
    return RandomOptimizer(spec, len(x0), default_batch, overlap)


# -- Optuna ---------------------------------------------------------------------------------------------


class OptunaOptimizer:
    """Optuna's samplers behind this ask/tell: NSGA-II (several objectives), TPE, CMA-ES, GP, random.
    Optuna rather than pymoo because its ask/tell interface takes one candidate at a time with no loop of its
    own (pymoo's ask/tell works on whole populations and owns the termination), its NSGA-II is seeded and a
    pure function of what it is told (tested: two studies told the same values ask the same genomes), and the
    same adapter gives the other samplers for free. The study lives in memory and is never saved: a resumed
    run replays the journal through a new one, as for every optimizer here.

    Rounds are the sampler's population (NSGA-II's generation); a round is asked whole before it is told, so
    overlap is 0 (NSGA-II reads a trial's generation from the trials complete when it is asked). A failed
    candidate is told as failed, and NSGA-II then never picks it as a parent.
    """

    def __init__(self, spec, size: int, default_batch: int, objectives: int) -> None:
        import optuna
        from optuna.distributions import FloatDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.batch = spec.batch or default_batch
        self.objectives = max(1, objectives)
        with warnings.catch_warnings():  # "experimental" notices for samplers' options
            warnings.simplefilter("ignore")
            sampler = _sampler(spec, self.batch)
        self.study = optuna.create_study(directions=["maximize"] * self.objectives, sampler=sampler)
        self.space = {f"x{i:03d}": FloatDistribution(0.0, 1.0) for i in range(size)}
        self._pending: list = []

    def ask(self, n: int) -> list[np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trials = [self.study.ask(self.space) for _ in range(n)]
        self._pending += trials
        return [np.array([t.params[k] for k in self.space], dtype=float) for t in trials]

    def tell(self, genomes: list[np.ndarray], told: Sequence[Feedback | float]) -> None:
        from optuna.trial import TrialState

        trials, self._pending = self._pending[: len(genomes)], self._pending[len(genomes) :]
        for trial, genome, feedback in zip(trials, genomes, told, strict=True):
            if not np.array_equal(np.array([trial.params[k] for k in self.space]), genome):
                raise RuntimeError("optuna: rounds must be told in the order they were asked")
            values = _values(feedback, self.objectives)
            if values is None:
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, values)


def _values(feedback: Feedback | float, count: int) -> list[float] | None:
    """What the study maximises: the objective vector, or minus the loss for one objective."""
    if isinstance(feedback, Feedback) and count > 1:
        values = [float(v) for v in feedback.objectives]
        if len(values) != count:
            return None
    else:
        loss = feedback.loss if isinstance(feedback, Feedback) else float(feedback)
        values = [-loss]
    return values if all(math.isfinite(v) for v in values) else None


def _sampler(spec, batch: int):
    import optuna.samplers as samplers

    seed = spec.seed
    if spec.sampler == "nsga2":
        return samplers.NSGAIISampler(population_size=batch, seed=seed)
    if spec.sampler == "tpe":
        return samplers.TPESampler(seed=seed, multivariate=True)
    if spec.sampler == "cmaes":
        return samplers.CmaEsSampler(seed=seed, popsize=batch)
    if spec.sampler == "gp":
        return samplers.GPSampler(seed=seed)
    return samplers.RandomSampler(seed=seed)


# -- M2N2 -------------------------------------------------------------------------------------------------


class M2n2Optimizer:
    """M2N2's archive over genomes: no member is ever held as a model, only as its genome and its
    per-item search results. Fitness shares each item among the members that earn it,
    f_i = sum_j s_ij / (sum_k s_kj)^alpha (an item many members solve is worth little); the first parent
    is drawn in proportion to that fitness, the second in proportion to its attraction to the first,
    sum_j max(0, F_kj - F_1j) on the shared values F (strong where the first is weak). A child takes, left
    of a random split point over the genome (genes in layer order), w of the first parent and 1 - w of the
    second, and the reverse right of it (the paper's code mixes parameters the same way, by SLERP; genes
    are mixed linearly here), plus Gaussian noise of sd `mutation`. Each child told replaces the archive's
    worst member when it is not itself the worst (replace-worst).

    Item values s are the tasks' per-item metric values times the task's weight, shifted per item so that
    the lowest value in the archive (child included) is 0: for exact match that is the paper's 0/1, and a
    log-probability task competes on how much better than the worst member a member does. The first round
    is the seed genomes (the sources alone, the default merge) and random ones; every random draw is from
    the optimizer's own seeded generator, in ask order, so replaying the journal reproduces it."""

    def __init__(
        self, spec, x0: np.ndarray, batch: int, seeds: Sequence[np.ndarray], weights: Mapping[str, float]
    ):
        self.rng = np.random.default_rng(spec.seed)
        self.size, self.batch = len(x0), spec.batch or batch
        self.mutation = spec.mutation
        self.seeds = [np.clip(np.asarray(g, dtype=float), 0.0, 1.0) for g in seeds]
        self.archive = ItemArchive(spec.archive_size, spec.alpha, weights)

    @property
    def genomes(self) -> list[np.ndarray]:
        return self.archive.members

    def ask(self, n: int) -> list[np.ndarray]:
        return [self._child() for _ in range(n)]

    def _child(self) -> np.ndarray:
        if self.seeds:
            return self.seeds.pop(0)
        if len(self.genomes) < 2:
            return self.rng.uniform(0.0, 1.0, self.size)
        shared = self.archive.shared()
        fitness = shared.sum(axis=1)
        first = int(self.rng.choice(len(fitness), p=_probabilities(fitness)))
        attraction = np.maximum(0.0, shared - shared[first]).sum(axis=1)
        second = int(self.rng.choice(len(attraction), p=_probabilities(attraction)))
        split, w = int(self.rng.integers(0, self.size)), float(self.rng.uniform())
        mix = np.where(np.arange(self.size) < split, w, 1.0 - w)
        child = (1.0 - mix) * self.genomes[first] + mix * self.genomes[second]
        if self.mutation:
            child = child + self.rng.normal(0.0, self.mutation, self.size)
        return np.clip(child, 0.0, 1.0)

    def tell(self, genomes: list[np.ndarray], told: Sequence[Feedback | float]) -> None:
        for genome, feedback in zip(genomes, told, strict=True):
            if isinstance(feedback, Feedback) and feedback.items is not None:  # a failed one never enters
                self.archive.offer(np.asarray(genome, dtype=float), feedback.items())


class ItemArchive:
    """M2N2's archive: members (genomes in the search; candidate ids where a report rebuilds it from the
    journal) with their item values, admitted by replace-worst on the shared fitness. A pure function of
    the order members are offered in, so the report's rebuild equals the search's archive."""

    def __init__(self, size: int, alpha: float, weights: Mapping[str, float]) -> None:
        self.size, self.alpha, self.weights = size, alpha, dict(weights)
        self.members: list[Any] = []
        self.scores: list[np.ndarray] = []  # per member: its item values, in a fixed task and item order
        self.layout: list[tuple[str, list[int]]] = []  # (task, item ids) in the order of `scores`' columns

    def shared(self) -> np.ndarray:
        return _shared(np.array(self.scores), self.alpha)

    def offer(self, member: Any, items: Mapping[str, Any]) -> bool:
        """Admit `member` (its per-item results by task) if the archive has room or it is not the worst."""
        values = self._values(items)
        if values is None:
            return False
        if len(self.members) < self.size:
            self.members.append(member)
            self.scores.append(values)
            return True
        fitness = _shared(np.array([*self.scores, values]), self.alpha).sum(axis=1)
        worst = int(np.argmin(fitness))
        if worst == len(self.members):
            return False
        self.members[worst], self.scores[worst] = member, values
        return True

    def _values(self, items: Mapping[str, Any]) -> np.ndarray | None:
        parts, layout = [], []
        for task in sorted(items):
            data = items[task]
            parts.append(np.asarray(data.values, dtype=float) * self.weights.get(task, 1.0))
            layout.append((task, [int(i) for i in data.ids]))
        values = np.concatenate(parts) if parts else np.zeros(0)
        if self.scores and values.shape != self.scores[0].shape:
            return None  # scored on other items than the archive (cannot happen at full fidelity)
        self.layout = self.layout or layout
        return values


def _shared(scores: np.ndarray, alpha: float) -> np.ndarray:
    """Each member's item values shifted to start at 0 per item and divided by the item's total^alpha."""
    s = scores - scores.min(axis=0, keepdims=True)
    total = s.sum(axis=0)
    z = np.where(total > 0, total, 1.0) ** alpha
    return s / z[None, :]


def _probabilities(weights: np.ndarray) -> np.ndarray:
    total = float(weights.sum())
    if not np.isfinite(total) or total <= 0:
        return np.full(len(weights), 1.0 / len(weights))
    return weights / total


# -- MAP-Elites (CycleQD) ---------------------------------------------------------------------------------


class MapElitesOptimizer:
    """CycleQD's archives through pyribs: one GridArchive per objective, whose behaviour coordinates are the
    other objectives' values (each in [0, 1], `cells` cells per coordinate; a value outside lands in the
    edge cell). Round g asks its candidates from objective q = g mod T's emitter (pyribs' IsoLineEmitter:
    a Gaussian step plus a step along the line to another elite, in the unit box), and every candidate
    told enters every archive it improves, so each archive keeps the best recipe found for each mix of the
    other skills. Plain MAP-Elites archives (pyribs' defaults: a cell's threshold is its elite's quality;
    a finite `threshold_min` would switch on CMA-MAE's batch threshold, which can let a worse candidate
    replace an elite). The emitters learn nothing from tells (IsoLineEmitter's tell is pyribs' no-op), so
    candidates go straight into the archives and a failed one enters none. Seeded: pyribs draws from the
    generators it is given, so replaying the journal asks the same candidates."""

    def __init__(self, spec, x0: np.ndarray, batch: int, objectives: int) -> None:
        from ribs.archives import GridArchive
        from ribs.emitters import IsoLineEmitter

        self.batch = spec.batch or batch
        self.count = objectives
        self.archives, self.emitters = [], []
        bounds = [(0.0, 1.0)] * len(x0)
        for q in range(objectives):
            archive = GridArchive(
                solution_dim=len(x0), dims=[spec.cells] * (objectives - 1), ranges=[(0.0, 1.0)] * (objectives - 1),
                seed=spec.seed + 7919 * q,
            )  # fmt: skip
            emitter = IsoLineEmitter(
                archive, iso_sigma=spec.iso_sigma, line_sigma=spec.line_sigma, x0=np.asarray(x0, dtype=float),
                bounds=bounds, batch_size=self.batch, seed=spec.seed + 104729 * (q + 1),
            )  # fmt: skip
            self.archives.append(archive)
            self.emitters.append(emitter)
        self.round = 0
        self._asking = False

    def ask(self, n: int) -> list[np.ndarray]:
        if n == 0:
            return []
        if self._asking:
            raise RuntimeError("map_elites: a round must be told before the next is asked")
        self._asking = True
        solutions = np.clip(self.emitters[self.round % self.count].ask(), 0.0, 1.0)
        return [np.array(x, dtype=float) for x in solutions[:n]]

    def tell(self, genomes: list[np.ndarray], told: Sequence[Feedback | float]) -> None:
        vectors = np.array([_objective_vector(f, self.count) for f in told], dtype=float).reshape(
            -1, self.count
        )
        ok = np.all(np.isfinite(vectors), axis=1)
        if ok.any():
            solutions = np.asarray(genomes, dtype=float)[ok]
            for k in range(self.count):
                others = [j for j in range(self.count) if j != k]
                self.archives[k].add(solutions, vectors[ok, k], np.clip(vectors[ok][:, others], 0.0, 1.0))
        self._asking = False
        self.round += 1

    def elites(self, objective: int) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """(genome, quality, behaviour) of each occupied cell of an objective's archive."""
        data = self.archives[objective].data()
        return list(zip(data["solution"], data["objective"], data["measures"], strict=True))


def _objective_vector(feedback: Feedback | float, count: int) -> list[float]:
    """The vector a candidate enters the archives with; NaN for a failed one (it enters none)."""
    if isinstance(feedback, Feedback) and len(feedback.objectives) == count:
        return [float(v) for v in feedback.objectives]
    return [math.nan] * count
