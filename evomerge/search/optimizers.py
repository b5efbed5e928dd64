"""Optimizers behind one ask/tell interface, over the unit box [0, 1]^n, minimising a loss.

A round is a CMA-ES generation (a batch for the others). Candidates may be asked in parts (the search
asks a few of the next round before it tells the current one) and each round is told whole, in the order
the rounds were asked. Its state is one picklable object: the experiment store saves it after every tell, and a resumed
run continues on exactly the trajectory it would have followed. No adapter touches global RNG state
(lm-eval reseeds numpy's global generator; cma draws from it by default).
"""

from __future__ import annotations

import pickle
from typing import Protocol

import numpy as np

from evomerge.config import CmaSpec, NevergradSpec, RandomSpec
from evomerge.errors import UserError, first_line


class Optimizer(Protocol):
    batch: int

    def ask(self, n: int) -> list[np.ndarray]: ...

    def tell(self, genomes: list[np.ndarray], losses: list[float]) -> None: ...


class CmaOptimizer:
    def __init__(self, spec: CmaSpec, x0: np.ndarray, popsize: int, overlap: int = 0) -> None:
        import warnings

        with warnings.catch_warnings():  # cma warns at import when matplotlib cannot be imported
            warnings.simplefilter("ignore")
            import cma

        self.rng = np.random.RandomState(spec.seed)
        self.batch = round_size(spec, popsize)
        options = {
            "bounds": [0.0, 1.0], "popsize": self.batch, "seed": spec.seed + 1,  # cma: seed 0 = from the clock
            "verbose": -9, "randn": self.rng.randn, "CMA_diagonal": False,
        }  # fmt: skip
        self.es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), spec.sigma0, options)

    def ask(self, n: int) -> list[np.ndarray]:
        return [np.asarray(x, dtype=float) for x in self.es.ask(n)] if n else []

    def tell(self, genomes: list[np.ndarray], losses: list[float]) -> None:
        self.es.tell([list(g) for g in genomes], list(losses))


class NevergradOptimizer:
    def __init__(self, spec: NevergradSpec, x0: np.ndarray, batch: int, overlap: int = 0) -> None:
        import nevergrad as ng

        if spec.optimizer not in ng.optimizers.registry:
            import difflib

            close = difflib.get_close_matches(spec.optimizer, list(ng.optimizers.registry), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"optimizer.optimizer: unknown nevergrad optimizer {spec.optimizer!r}{hint}")
        self.batch = round_size(spec, batch)
        param = ng.p.Array(init=np.asarray(x0, dtype=float)).set_mutation(sigma=1 / 6).set_bounds(0.0, 1.0)
        param.random_state = np.random.RandomState(spec.seed)
        self.opt = ng.optimizers.registry[spec.optimizer](
            parametrization=param, budget=spec.budget, num_workers=self.batch + overlap
        )
        self._pending: list = []  # asked, not yet told, in ask order
        _check_picklable(self, spec.optimizer)

    def ask(self, n: int) -> list[np.ndarray]:
        asked = [self.opt.ask() for _ in range(n)]
        self._pending += asked
        return [np.asarray(c.value, dtype=float) for c in asked]

    def tell(self, genomes: list[np.ndarray], losses: list[float]) -> None:
        told, self._pending = self._pending[: len(genomes)], self._pending[len(genomes) :]
        for candidate, genome, loss in zip(told, genomes, losses, strict=True):
            if not np.array_equal(np.asarray(candidate.value, dtype=float), genome):
                raise RuntimeError("nevergrad: rounds must be told in the order they were asked")
            self.opt.tell(candidate, loss)


class RandomOptimizer:
    def __init__(self, spec: RandomSpec, size: int, batch: int, overlap: int = 0) -> None:
        self.rng = np.random.RandomState(spec.seed)
        self.size, self.batch = size, round_size(spec, batch)

    def ask(self, n: int) -> list[np.ndarray]:
        return [self.rng.uniform(0.0, 1.0, self.size) for _ in range(n)]

    def tell(self, genomes: list[np.ndarray], losses: list[float]) -> None:
        pass


def _check_picklable(optimizer: NevergradOptimizer, name: str) -> None:
    """An optimizer whose state cannot be saved cannot be resumed: refuse it up front. (Asking once
    instantiates the lazily chosen sub-optimizer, which is where e.g. NGOpt's threaded COBYLA appears.)"""
    try:
        probe = pickle.loads(pickle.dumps(optimizer))
        probe.ask(1)
        pickle.dumps(probe)
    except Exception as exc:
        raise UserError(
            f"optimizer.optimizer: nevergrad {name} cannot be checkpointed, so a run could not resume "
            f"({type(exc).__name__}: {first_line(exc, 120)}); try CMA, TwoPointsDE, DE or PSO"
        ) from None
    finally:
        _stop_threads(locals().get("probe"))


def _stop_threads(optimizer) -> None:
    """Nevergrad's recast optimizers (e.g. COBYLA under NGOpt) run a helper thread; stop it so the
    interpreter can exit."""
    if optimizer is None:
        return
    stop = getattr(getattr(optimizer, "opt", None), "_messaging_thread", None)
    if stop is not None and hasattr(stop, "stop"):
        stop.stop()


def round_size(spec, default: int) -> int:
    """Candidates per round: cma's popsize, the others' batch, or the search space's default."""
    return (spec.popsize if isinstance(spec, CmaSpec) else spec.batch) or default


def make_optimizer(spec, x0: np.ndarray, default_batch: int, overlap: int = 0) -> Optimizer:
    if isinstance(spec, CmaSpec):
        return CmaOptimizer(spec, x0, default_batch, overlap)
    if isinstance(spec, NevergradSpec):
        return NevergradOptimizer(spec, x0, default_batch, overlap)
    return RandomOptimizer(spec, len(x0), default_batch, overlap)


def dump_state(optimizer: Optimizer) -> bytes:
    return pickle.dumps(optimizer, protocol=pickle.HIGHEST_PROTOCOL)


def load_state(blob: bytes) -> Optimizer:
    """Only ever called on the blob this experiment's own database holds (written by `dump_state`)."""
    return pickle.loads(blob)  # noqa: S301
