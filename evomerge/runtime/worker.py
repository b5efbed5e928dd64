"""A worker: the sources resident once, one target model, one evaluator; merges and scores recipes.

Built once per process (local executor) or per Ray actor. Everything it takes and returns is plain data
(recipe dicts, `Outcome`), so the search loop never sees a tensor. A candidate that fails to merge or to
evaluate comes back as a failed outcome with its reason.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from evomerge.config import ExperimentConfig
from evomerge.errors import UserError, first_line, non_finite_message
from evomerge.merge.methods import Method
from evomerge.merge.recipe import CONFIG_KIND, PathRecipe, Recipe
from evomerge.runtime.jobs import Outcome
from evomerge.runtime.plan import concrete

log = logging.getLogger(__name__)


def build_worker(config: ExperimentConfig | dict, config_dir: str | Path | None, manager=None):
    """The worker an experiment needs (PS or DFS). Takes the config as plain data too, which is how it
    travels to a Ray actor."""
    if isinstance(config, dict):
        config = ExperimentConfig.model_validate(config)
    config_dir = Path(config_dir) if config_dir is not None else None
    kind = DfsWorker if config.dfs is not None else Worker
    return kind(config, config_dir, manager)


class _Runs:
    def run(self, job) -> Outcome:
        """An executor's job: a recipe to merge and score, or a source scored as it is."""
        if job.recipe is not None:
            return self.evaluate(job.recipe, job.split, job.items)
        return self.evaluate_source(job.source, job.split, job.items)


class Worker(_Runs):
    def __init__(self, config: ExperimentConfig, config_dir: Path | None, manager=None) -> None:
        from evomerge.device import resolve_device
        from evomerge.evaluate.evaluator import Evaluator
        from evomerge.merge.engine import MergeEngine
        from evomerge.models.checkpoint import parse_dtype
        from evomerge.models.loading import load_target, load_tokenizer, open_models

        concrete(config)
        device, dtype = resolve_device(config.runtime.device), parse_dtype(config.runtime.dtype)
        self.base, self.sources, _ = open_models(config, config_dir)
        first = self.base or self.sources[0]
        started = time.perf_counter()
        self.target = load_target(first, device=device, dtype=dtype)
        compile_ = {"auto": "auto", "on": True, "off": False}[config.runtime.compile]
        runtime = config.runtime  # resolved once, before workers start (runtime/plan.py)
        self._engine_args = dict(device=device, dtype=dtype, compile=compile_, placement=runtime.placement,
                                 pin=runtime.pin_memory == "on")  # fmt: skip
        self.refs = (list(config.models.sources), config.models.base)  # as a merge config names them
        pool = config.mergekit_genome is not None and _pooled(config.merge.method)
        self.engine = MergeEngine(
            None if pool else self.base, self.sources, config.merge.method, self.target,
            **self._engine_args, pool=pool,
        )  # fmt: skip
        self.evaluator = Evaluator(
            self.target, load_tokenizer(first), config.evaluation, manager, config.length_tasks()
        )
        self.calibration = config.merge.calibration
        self._grams: dict[str, list] | None = None
        self._calibrate()
        self.load_seconds = time.perf_counter() - started

    def _calibrate(self) -> None:
        """A calibrated method's activation statistics (RegMean's Grams), computed once per worker from the
        calibration items and kept for every engine of that method (a function of the config: every worker
        and every resumed run computes the same)."""
        if not self.engine.method.spec.calibrated:
            return
        if self._grams is None:
            from evomerge.merge.calibration import batches_of, grams_per_model

            task = self.calibration.task
            texts = self.evaluator.calibration_prompts(task, self.calibration.items)
            device = next(self.target.parameters()).device
            batches = batches_of(self.evaluator.lm.tokenizer, texts, device)
            self._grams = grams_per_model(self._each_source(), batches, set(self.engine.names))
            log.info("calibration: Gram matrices of %d linear layers from %d items of %s",
                     len(self._grams), len(texts), task)  # fmt: skip
        self.engine.calibrate(self._grams)

    def _each_source(self):
        """The target holding each source in turn (no second model in memory)."""
        for index in range(len(self.sources)):
            self.engine.load_input(index)
            yield self.target

    def evaluate(self, recipe: dict[str, Any], split: str = "search", items: dict | None = None) -> Outcome:
        """Merge `recipe` into the target and score it (on `items` only, when given)."""
        started = time.perf_counter()
        try:
            if recipe.get("kind") == CONFIG_KIND:
                self._apply_config(recipe["config"])
            else:
                parsed = Recipe.from_dict(recipe)
                if parsed.method is not self.engine.method or self.engine.pool:
                    self._switch(parsed.method)
                self.engine.apply(parsed)
            bad = self.engine.non_finite()
            if bad is not None:
                raise UserError(non_finite_message(bad, str(self.engine.targets[bad].dtype)))
        except Exception as exc:  # a recipe that cannot be merged (bad value, OOM) is a failed candidate
            return Outcome(
                False, -math.inf, reason=f"merge: {_reason(exc)}", merge_seconds=time.perf_counter() - started
            )
        return _score(self.evaluator, split, items, time.perf_counter() - started)

    def evaluate_source(self, index: int, split: str = "heldout", items: dict | None = None) -> Outcome:
        """Source model `index` unchanged (a parent baseline)."""
        started = time.perf_counter()
        self.engine.load_input(index)
        return _score(self.evaluator, split, items, time.perf_counter() - started)

    def _apply_config(self, config: dict[str, Any]) -> None:
        """A merge-config candidate (a migrated mergekit-evolve run): mergekit's rules resolve each tensor's
        parameters (and, for slerp, which two models), the engine merges in place."""
        from evomerge.merge.config_apply import config_params
        from evomerge.merge.methods import parse_method

        method = parse_method(config["merge_method"])
        pool = _pooled(method)
        if method is not self.engine.method or pool != self.engine.pool:
            self._switch(method, pool)
        engine = self.engine
        params, pick = config_params(
            config, engine.names, engine.family, engine.num_layers, *self.refs, pool=pool
        )
        engine.apply(params, pick)

    def _switch(self, method: Method, pool: bool = False) -> None:
        """Rebuild the engine for another method (the finals' default merges); the old one is freed first
        so that sources are never resident twice."""
        from evomerge.merge.engine import MergeEngine

        log.info("switching the merge engine to %s", method.value)
        self.engine = None
        base = None if pool else self.base
        self.engine = MergeEngine(base, self.sources, method, self.target, **self._engine_args, pool=pool)
        self._calibrate()


class DfsWorker(_Runs):
    """The sources loaded once as models; each candidate is a layer path over their layers (no copy)."""

    def __init__(self, config: ExperimentConfig, config_dir: Path | None, manager=None) -> None:
        from evomerge.device import resolve_device
        from evomerge.evaluate.evaluator import Evaluator
        from evomerge.models.checkpoint import parse_dtype
        from evomerge.models.loading import load_target, load_tokenizer, open_models

        started = time.perf_counter()
        concrete(config)
        device, dtype = resolve_device(config.runtime.device), parse_dtype(config.runtime.dtype)
        _, checkpoints, _ = open_models(config, config_dir)
        self.models = [load_target(c, device=device, dtype=dtype) for c in checkpoints]
        self.evaluator = Evaluator(
            self.models[0], load_tokenizer(checkpoints[0]), config.evaluation, manager, config.length_tasks()
        )
        self.load_seconds = time.perf_counter() - started

    def evaluate(self, recipe: dict[str, Any], split: str = "search", items: dict | None = None) -> Outcome:
        from evomerge.merge.dfs import path_model

        started = time.perf_counter()
        try:
            parsed = PathRecipe.from_dict(recipe)
            model = path_model(self.models, list(parsed.path), list(parsed.scales), parsed.ends)
        except Exception as exc:
            return Outcome(
                False, -math.inf, reason=f"path: {_reason(exc)}", merge_seconds=time.perf_counter() - started
            )
        self.evaluator.set_model(model)
        return _score(self.evaluator, split, items, time.perf_counter() - started)

    def evaluate_source(self, index: int, split: str = "heldout", items: dict | None = None) -> Outcome:
        self.evaluator.set_model(self.models[index])
        return _score(self.evaluator, split, items, 0.0)


def _pooled(method: Method) -> bool:
    """mergekit-evolve's slerp slices pick two models per layer group: the engine holds them as a pool."""
    return method is Method.slerp


def _score(evaluator, split: str, items: dict | None, build_seconds: float) -> Outcome:
    """Evaluate the model the evaluator holds now; `build_seconds` is what making it took (merge, path)."""
    result = evaluator.evaluate(split, items)
    return Outcome(
        result.ok, result.fitness, result.metrics, result.error, build_seconds, result.seconds, result.items,
        sum(result.examples.values()),
    )  # fmt: skip


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"
