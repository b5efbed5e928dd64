"""The experiment config: one strict pydantic schema for `evomerge search` / `validate`.

Every mistake is reported as one line naming the key's path (`optimizer.sigma0: ...`), before any model
or task is loaded. Relative model paths resolve against the working directory first, then the config
file's directory (as in `evomerge merge`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from evomerge.errors import UserError
from evomerge.evaluate.spec import EvaluationSpec
from evomerge.merge.methods import REGISTRY, Method
from evomerge.strict_yaml import load_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsSpec(_Strict):
    base: str | None = Field(None, description="the common ancestor (needed by every method but linear)")
    sources: list[str] = Field(min_length=1, description="the fine-tunes to merge")

    @field_validator("sources")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a source is listed twice")
        return value

    @model_validator(mode="after")
    def _base_not_a_source(self) -> ModelsSpec:
        if self.base is not None and self.base in self.sources:
            raise ValueError(f"base {self.base} is also listed in sources")
        return self


class CalibrationSpec(_Strict):
    """Where a data-aware merge (regmean) takes its activation statistics: the first `items` of a configured
    task's search split (never its held-out items), each as the prompt the evaluator gives it."""

    task: str = Field(description="a task of evaluation.tasks")
    items: int = Field(256, ge=1, description="search-split items whose activations are averaged")


class MergeSpec(_Strict):
    method: Method = Method.ties
    normalize: bool | None = Field(None, description="default: the method's own (true for ties, linear)")
    rescale: bool | None = Field(None, description="default: the method's own (true for dare_*, della*)")
    baselines: list[Method] = Field(
        default_factory=list, description="more default merges for the finals (e.g. model_stock, karcher)"
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="tensor names or substrings the subspace merges (tsv_m, iso_c, iso_cts, wudi) give the task "
        "vectors' mean instead of the matrix treatment, e.g. [embed_tokens, lm_head]",
    )

    calibration: CalibrationSpec | None = Field(
        None, description="activation statistics for regmean: items of a configured task's search split"
    )

    @model_validator(mode="after")
    def _calibration_when_needed(self) -> MergeSpec:
        needs = [m.value for m in [self.method, *self.baselines] if m.spec.calibrated]
        if needs and self.calibration is None:
            raise ValueError(
                f"{needs[0]} merges from activation statistics: set merge.calibration "
                "({task: a configured task, items: N}) to take them from that task's search split"
            )
        return self

    @model_validator(mode="after")
    def _exclude_applies(self) -> MergeSpec:
        if self.exclude and self.method.spec.param("exclude") is None:
            takes = ", ".join(m for m in Method if Method(m).spec.param("exclude") is not None)
            raise ValueError(f"exclude: {self.method.value} has no matrix treatment to skip (only {takes})")
        if any(not part for part in self.exclude):
            raise ValueError("exclude: an empty string would match every tensor")
        return self


class Bounds(_Strict):
    """A gene kind's range. Subclasses narrow the allowed interval (`_open_low`: the low end excluded)."""

    min: float
    max: float
    _limits: ClassVar[tuple[float, float, bool] | None] = None

    @field_validator("min", "max")
    @classmethod
    def _allowed(cls, value: float) -> float:
        if cls._limits is not None:
            low, high, open_low = cls._limits
            if not ((low < value if open_low else low <= value) and value <= high):
                raise ValueError(f"must be in {'(' if open_low else '['}{low:g}, {high:g}]")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise ValueError("min and max must be finite")
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class DensityBounds(Bounds):
    min: float = 0.1
    max: float = 1.0
    _limits: ClassVar[tuple[float, float, bool] | None] = (0.0, 1.0, True)


class UnitBounds(Bounds):
    min: float = 0.0
    max: float = 1.0
    _limits: ClassVar[tuple[float, float, bool] | None] = (0.0, 1.0, False)


class _SpaceBase(_Strict):
    """Which tensor groups get their own genes, and the range each kind of gene maps to."""

    layers_per_group: int = Field(1, ge=1, description="consecutive layers that share genes")
    split: bool = Field(False, description="separate genes for each layer's attention and MLP")
    embeddings: bool = Field(
        True, description="genes for the embeddings and the head; false: they take the default merge"
    )
    weight: Bounds | None = None
    density: DensityBounds | None = None
    t: UnitBounds | None = None

    def range(self, param) -> tuple[float, float]:
        """The gene range of a method parameter: the config's `space.<name>` when given (an override,
        checked against the method's limits), else the method's own (`Param.gene`, the one source)."""
        given = getattr(self, param.name, None)
        return param.gene if given is None else (given.min, given.max)


# What schemas before gene ranges came from the method records wrote for unset weight, density and t: an
# unset range still identifies an experiment this way, so those experiments resume.
_LEGACY_BOUNDS = {
    "weight": {"min": 0.0, "max": 1.0},
    "density": {"min": 0.1, "max": 1.0},
    "t": {"min": 0.0, "max": 1.0},
}

# The searchable parameters of the registered methods beyond weight, density and t (gamma, epsilon, ...):
# each an optional `space.<name>: {min, max}`, checked against the experiment's method.
METHOD_GENES = sorted({p.name for m in REGISTRY.values() for p in m.genes} - set(_SpaceBase.model_fields))
SpaceSpec = create_model(
    "SpaceSpec",
    __base__=_SpaceBase,
    __doc__=_SpaceBase.__doc__,
    **{n: (Bounds | None, None) for n in METHOD_GENES},
)


class ScaleBounds(Bounds):
    min: float = 0.0
    max: float = 2.0


SEARCH = "search"
ENDS = ("embeddings", "head")
EndRef = int | str  # a source: its index, its reference as listed, or its directory name; or "search"


class DfsEnds(_Strict):
    """Which source gives a path model its embeddings, and which its final norm and lm_head: a source
    (index from 0, its reference as listed in the sources, or its directory name) or `search` (a gene)."""

    embeddings: EndRef = Field(0, description="the source of the token embeddings, or search")
    head: EndRef = Field(0, description="the source of the final norm and lm_head, or search")

    @field_validator("embeddings", "head")
    @classmethod
    def _non_negative(cls, value: EndRef) -> EndRef:
        if isinstance(value, int) and value < 0:
            raise ValueError("a source index is 0 or more")
        return value


def _ends(value: Any) -> Any:
    """`ends: X` is short for `ends: {embeddings: X, head: X}`."""
    return value if isinstance(value, dict | DfsEnds) else {"embeddings": value, "head": value}


class DfsSpec(_Strict):
    """Data-flow space: which layers of the sources (A first) a token passes through, and with what scale.
    The slots are all layers of the sources in order, repeated `repeats` times."""

    repeats: int = Field(2, ge=1, le=8)
    scale: Literal["scalar", "matrix"] = Field(
        "scalar", description="a scale gene per slot, or Sakana's M x M matrix (previous layer, this layer)"
    )
    scale_bounds: ScaleBounds = ScaleBounds()
    keep_ends: bool = Field(True, description="model A's first and last layers at both ends of every path")
    init_a_path: bool = Field(True, description="start where model A's own path is the most likely")
    min_layers: int = Field(1, ge=1)
    max_layers: int | None = Field(None, ge=1)
    ends: Annotated[DfsEnds, BeforeValidator(_ends, json_schema_input_type=DfsEnds | EndRef)] = Field(
        DfsEnds(),
        description="where embeddings and final norm + lm_head come from: a source (index, reference or "
        "directory name) or search, for both or as {embeddings: ..., head: ...}; default model A",
    )

    @model_validator(mode="after")
    def _lengths(self) -> DfsSpec:
        if self.max_layers is not None and self.max_layers < self.min_layers:
            raise ValueError(f"max_layers ({self.max_layers}) is below min_layers ({self.min_layers})")
        return self


MAX_SEED = 2**32 - 2  # numpy's RandomState takes < 2**32, and cma is given seed + 1


class GenomeSpec(_Strict):
    """mergekit-evolve's genome (a migrated mergekit-evolve config): the search runs over its genotype, with
    its meaning (evomerge/mergekit_evolve.py), instead of evomerge's `space`. `models.sources` are the
    genome's `models` in order, `models.base` its `base_model`, `merge.method` its `merge_method`."""

    layer_granularity: int = Field(
        0,
        ge=0,
        description="layers per gene group (0: one group for the whole model); must divide the layers",
    )
    normalize: bool | None = Field(None, description="default: true for ties, dare_ties and linear")
    allow_negative_weights: bool = Field(False, description="weights keep their sign (else |w|)")
    filters: list[str] | None = Field(
        None, description="tensor-name substrings that get their own parameter set (the rest: one more)"
    )
    smooth: bool = Field(False, description="each parameter a gradient over the layer groups")
    tokenizer_source: str | None = Field(None, description="written into the exported merge config")
    random_init: bool = Field(
        False, description="start CMA-ES from a random genotype (seeded by optimizer.seed)"
    )


class _OptimizerSpec(_Strict):
    budget: int = Field(200, ge=1, description="evaluations on the search split")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    overlap: int | None = Field(
        None,
        ge=0,
        description="candidates of the next round asked before the current round is told, so that workers "
        "freed at the round's end have work; default half a round. Part of the search's definition, not "
        "of the executor: every executor runs the same candidates",
    )

    @model_validator(mode="after")
    def _round_within_budget(self) -> _OptimizerSpec:
        key = "popsize" if self.name == "cma" else "batch"
        size = getattr(self, key)
        if size is not None and size > self.budget:
            raise ValueError(
                f"{key} {size} is more than the budget ({self.budget} evaluations): not one round could be "
                f"told; lower {key} or raise budget"
            )
        return self


class CmaSpec(_OptimizerSpec):
    name: Literal["cma"]
    sigma0: float = Field(1 / 6, gt=0, le=1)
    popsize: int | None = Field(None, ge=2, description="default 4 + floor(3 ln n)")


class NevergradSpec(_OptimizerSpec):
    name: Literal["nevergrad"]
    optimizer: str = "TwoPointsDE"
    batch: int | None = Field(None, ge=1, description="candidates asked per round; default as cma's popsize")


class RandomSpec(_OptimizerSpec):
    """Uniform random genomes: the baseline any optimizer must beat at the same budget."""

    name: Literal["random"]
    batch: int | None = Field(None, ge=1)


class OptunaSpec(_OptimizerSpec):
    """One of Optuna's samplers: NSGA-II for several objectives (the default), TPE, CMA-ES, GP or random."""

    name: Literal["optuna"]
    sampler: Literal["nsga2", "tpe", "cmaes", "gp", "random"] = "nsga2"
    batch: int | None = Field(None, ge=2, description="candidates per round (NSGA-II's population)")

    @model_validator(mode="after")
    def _no_overlap(self) -> OptunaSpec:
        if self.overlap:
            raise ValueError("overlap: optuna's rounds are asked whole before they are told (overlap 0)")
        return self


class M2n2Spec(_OptimizerSpec):
    """M2N2 (Sakana, "Competition and Attraction Improve Model Fusion", GECCO 2025): an archive of recipes
    whose fitness is shared per search item; parents chosen by fitness and by attraction; split-point
    crossover of recipes. Defaults as the paper's code: archive 20, alpha 1."""

    name: Literal["m2n2"]
    archive_size: int = Field(20, ge=2, description="recipes kept (P)")
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False, description="how strongly an item's value is shared")
    mutation: float = Field(0.01, ge=0, le=1, description="sd of the Gaussian added to each child gene")
    batch: int | None = Field(
        None, ge=1, description="children asked per round; default the space's round size"
    )


class MapElitesSpec(_OptimizerSpec):
    """MAP-Elites archives after CycleQD (Sakana, ICLR 2025), through pyribs: one archive per objective,
    whose other objectives are its behaviour coordinates; the objective that is the quality cycles each
    round."""

    name: Literal["map_elites"]
    cells: int = Field(10, ge=2, le=100, description="cells per behaviour coordinate")
    iso_sigma: float = Field(0.05, gt=0, le=1, description="isotropic Gaussian step (pyribs IsoLineEmitter)")
    line_sigma: float = Field(0.2, ge=0, le=1, description="step along the line between two elites")
    batch: int | None = Field(None, ge=1, description="candidates per round; default the space's round size")

    @model_validator(mode="after")
    def _no_overlap(self) -> MapElitesSpec:
        if self.overlap:
            raise ValueError(
                "overlap: map_elites asks a round only after the previous one is told (overlap 0)"
            )
        return self


OptimizerSpec = Annotated[
    CmaSpec | NevergradSpec | RandomSpec | OptunaSpec | M2n2Spec | MapElitesSpec, Field(discriminator="name")
]
MULTI_OBJECTIVE_SAMPLERS = ("nsga2", "tpe", "gp", "random")


class ObjectiveSpec(_Strict):
    """One objective of a multi-objective search: a task's metric, or the mean number of tokens a
    generation task's answers take (`generation_length: <task>`, minimised by default)."""

    task: str | None = None
    generation_length: str | None = None
    metric: str | None = Field(None, description="default: the task's configured metric")
    direction: Literal["max", "min"] | None = Field(
        None, description="default max; min for generation_length"
    )
    reference: float | None = Field(
        None,
        allow_inf_nan=False,
        description="this objective's coordinate of the hypervolume's reference point (a value every front "
        "member should beat); default 0 for a maximised objective, the worst finalist's for a minimised one",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> ObjectiveSpec:
        if (self.task is None) == (self.generation_length is None):
            raise ValueError("an objective names a task (task: NAME) or a length (generation_length: NAME)")
        if self.generation_length is not None and self.metric is not None:
            raise ValueError("metric: generation_length is a metric of its own")
        return self

    @property
    def task_name(self) -> str:
        return self.task if self.task is not None else self.generation_length

    @property
    def maximize(self) -> bool:
        default = "min" if self.generation_length is not None else "max"
        return (self.direction or default) == "max"

    @property
    def label(self) -> str:
        return self.task if self.task is not None else f"generation_length {self.generation_length}"


class StageSpec(_Strict):
    """One stage of a staged experiment: the experiment's sections, with these replaced. In `sources`,
    `previous` stands for the previous stage's best candidate (exported as a model)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    sources: list[str] | None = None
    merge: MergeSpec | None = None
    space: SpaceSpec | None = None
    dfs: DfsSpec | None = None
    optimizer: OptimizerSpec | None = None


PREVIOUS = "previous"


class RaySpec(_Strict):
    address: str | None = Field(
        None, description="an existing cluster to join ('auto' or host:port); default: start a local one"
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="actors, each holding the sources once; default one per GPU, else per CPU slot",
    )
    cpus_per_worker: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="CPU slot of a worker (its torch threads on CPU)"
    )


class RuntimeSpec(_Strict):
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$", description="auto, cpu, cuda or cuda:N"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="how models are held: auto = as the checkpoints store them (float32 when they differ, "
        "and for float16 on a CPU); merge math is float32 whatever this is",
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="local: one worker in this process; ray: actors on this machine or a cluster"
    )
    ray: RaySpec = RaySpec()
    compile: Literal["auto", "on", "off"] = "auto"
    placement: Literal["auto", "device", "host"] = Field(
        "auto",
        validation_alias=AliasChoices("placement", "sources"),  # `sources` until 2026-12: still read
        description="where base and sources live: device, host (streamed to the device per tensor; see "
        "pin_memory), auto (device when the memory plan fits the device's free memory, else host)",
    )
    pin_memory: Literal["auto", "on", "off"] = Field(
        "auto",
        description="page-lock host sources on CUDA (asynchronous copies): auto = when they take at most half "
        "of the machine's RAM, so a large pinned set never starves the rest of it",
    )
    eval_tokens: int = Field(
        1024, gt=0, description="prompt + generated tokens per sequence that the memory plan allows for"
    )
    stop_after_failures: int = Field(
        5, ge=1, description="stop when the first this-many candidates all fail (a broken setup)"
    )


class OutputSpec(_Strict):
    dir: str = Field(description="the experiment directory (created; resumed when it exists)")


class ExperimentConfig(_Strict):
    name: str | None = None
    models: ModelsSpec
    merge: MergeSpec = MergeSpec()
    space: SpaceSpec = SpaceSpec()
    dfs: DfsSpec | None = Field(None, description="search the data-flow space of models.sources instead")
    optimizer: OptimizerSpec = CmaSpec(name="cma")
    evaluation: EvaluationSpec
    runtime: RuntimeSpec = RuntimeSpec()
    output: OutputSpec
    stages: list[StageSpec] | None = Field(
        None, min_length=1, description="run these searches in turn (e.g. PS, then DFS over its best)"
    )
    objectives: list[ObjectiveSpec] | None = Field(
        None, min_length=1, description="optimise these at once (a Pareto front) instead of one weighted sum"
    )
    mergekit_genome: GenomeSpec | None = Field(
        None, description="search mergekit-evolve's genotype instead of space (written by `evomerge import`)"
    )

    @model_validator(mode="after")
    def _genome_fits(self) -> ExperimentConfig:
        if self.mergekit_genome is None:
            return self
        from evomerge.mergekit_evolve import METHOD_PARAMS

        for key, value in (("dfs", self.dfs), ("stages", self.stages)):
            if value is not None:
                raise ValueError(f"mergekit_genome: {key} cannot be used with a mergekit-evolve genome")
        space = self.space
        for key, default in (("layers_per_group", 1), ("split", False), ("embeddings", True)):
            if getattr(space, key) != default:
                raise ValueError(f"mergekit_genome: space.{key} has no meaning for mergekit-evolve's genome "
                                 "(layer_granularity sets its groups)")  # fmt: skip
        method = self.merge.method.value
        if method not in METHOD_PARAMS:
            raise ValueError(f"mergekit_genome: merge.method {method} is not one of mergekit-evolve's "
                             f"({', '.join(METHOD_PARAMS)})")  # fmt: skip
        for name in ["weight", "density", "t", *METHOD_GENES]:
            if getattr(space, name) is not None and name not in METHOD_PARAMS[method]:
                raise ValueError(f"mergekit_genome: space.{name} is not a gene of {method} "
                                 f"({', '.join(METHOD_PARAMS[method])})")  # fmt: skip
        if self.merge.exclude or self.merge.calibration or self.merge.rescale is not None:
            raise ValueError(
                "mergekit_genome: merge.exclude, merge.calibration and merge.rescale do not apply"
            )
        if self.merge.normalize is not None:
            raise ValueError("mergekit_genome: set normalize under mergekit_genome")
        try:
            self.evolve_genome()
        except ValueError as exc:
            raise ValueError(f"mergekit_genome: {exc.errors()[0]['msg'].removeprefix('Value error, ')}"
                             if hasattr(exc, "errors") else f"mergekit_genome: {exc}") from None  # fmt: skip
        base = self.models.base
        if base is not None and method in ("linear", "slerp"):
            raise ValueError(
                f"mergekit_genome: {method} with a base_model that is not one of the genome's models: mergekit "
                "would stop at the first merge ("
                + ("slerp takes two models" if method == "slerp" else "the base has no weight")
                + "); leave base_model out"  # fmt: skip
            )
        if method == "slerp" and len(self.models.sources) < 2:
            raise ValueError("mergekit_genome: slerp needs at least two models")
        return self

    def evolve_genome(self):
        """The genome section as mergekit-evolve's definition (its rules checked)."""
        from evomerge.mergekit_evolve import EvolveGenome

        g = self.mergekit_genome
        return EvolveGenome(
            models=list(self.models.sources), merge_method=self.merge.method.value, base_model=self.models.base,
            tokenizer_source=g.tokenizer_source, layer_granularity=g.layer_granularity, normalize=g.normalize,
            allow_negative_weights=g.allow_negative_weights, filters=g.filters, smooth=g.smooth,
        )  # fmt: skip

    @model_validator(mode="after")
    def _calibration_task_configured(self) -> ExperimentConfig:
        calibration = self.merge.calibration
        if calibration is not None and calibration.task not in {t.name for t in self.evaluation.tasks}:
            raise ValueError(
                f"merge.calibration.task: {calibration.task!r} is not one of evaluation.tasks "
                f"({', '.join(t.name for t in self.evaluation.tasks)})"
            )
        return self

    @model_validator(mode="after")
    def _map_elites_fits(self) -> ExperimentConfig:
        if not isinstance(self.optimizer, MapElitesSpec):
            return self
        objectives = self.objectives or []
        if len(objectives) < 2:
            raise ValueError(
                "optimizer map_elites keeps one archive per objective over the others' scores: list at least "
                "two objectives"
            )
        if any(o.generation_length is not None for o in objectives):
            raise ValueError(
                "optimizer map_elites: a generation_length objective has no fixed range for the archive's "
                "grid; use task metrics in [0, 1]"
            )
        return self

    @model_validator(mode="after")
    def _archives_need_full_fitness(self) -> ExperimentConfig:
        why = {
            "m2n2": "compares archive members item by item, so every candidate must be scored on the same items",
            "map_elites": "places every candidate in its cell once, on its real scores",
        }.get(self.optimizer.name)
        if why and self.evaluation.fidelity.mode != "full":
            raise ValueError(
                f"optimizer {self.optimizer.name} {why}: evaluation.fidelity {self.evaluation.fidelity.mode} "
                "cannot be used (full only)"
            )
        return self

    @model_validator(mode="after")
    def _objectives_fit(self) -> ExperimentConfig:
        if not self.objectives:
            return self
        names = [t.name for t in self.evaluation.tasks]
        seen = set()
        for i, objective in enumerate(self.objectives):
            key = "task" if objective.task is not None else "generation_length"
            if objective.task_name not in names:
                raise ValueError(
                    f"objectives[{i}].{key}: {objective.task_name!r} is not one of evaluation.tasks ({', '.join(names)})"
                )
            if objective.label in seen:
                raise ValueError(f"objectives[{i}]: {objective.label} is listed twice")
            seen.add(objective.label)
        mode = self.evaluation.fidelity.mode
        if mode in ("anchors", "racing"):
            raise ValueError(
                f"objectives: evaluation.fidelity {mode} ranks candidates by one fitness, which a front has "
                "not; use full or subsample"
            )
        spec = self.optimizer
        if (
            isinstance(spec, OptunaSpec)
            and spec.sampler not in MULTI_OBJECTIVE_SAMPLERS
            and len(self.objectives) > 1
        ):
            raise ValueError(
                f"optimizer.sampler: optuna's {spec.sampler} optimises one objective; for several use "
                f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)}"
            )
        return self

    @model_validator(mode="after")
    def _stages_fit(self) -> ExperimentConfig:
        if not self.stages:
            return self
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stages: two stages have the same name")
        if PREVIOUS in (self.stages[0].sources or []):
            raise ValueError(f"stages[0].sources: the first stage has no {PREVIOUS!r} stage")
        for i in range(len(self.stages)):
            self.stage_config(i, Path("previous-stage-model"))  # each stage must be a valid experiment
        return self

    def stage_config(self, index: int, previous: Path | None) -> ExperimentConfig:
        """Stage `index` as a plain experiment (its output dir is the experiment's dir / stage name)."""
        stage = self.stages[index]
        data = self.model_dump(mode="json", exclude={"stages"})
        if stage.sources is not None:
            data["models"]["sources"] = [str(previous) if s == PREVIOUS else s for s in stage.sources]
        data["dfs"] = None
        for key in ("merge", "space", "dfs", "optimizer"):
            value = getattr(stage, key)
            if value is not None:
                data[key] = value.model_dump(mode="json", exclude_unset=True)
        if stage.dfs is not None and "ends" in stage.dfs.model_fields_set:
            written = stage.sources if stage.sources is not None else self.models.sources
            try:
                indices = resolve_ends(stage.dfs.ends, written)
            except UserError as exc:
                raise ValueError(f"stages[{index}] ({stage.name}): {exc}") from None
            data["dfs"]["ends"] = dict(zip(ENDS, (SEARCH if i is None else i for i in indices), strict=True))
        data["name"] = f"{self.name or 'experiment'}/{stage.name}"
        data["output"] = {"dir": str(Path(self.output.dir) / stage.name)}
        try:
            return ExperimentConfig.model_validate(data)
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc, f"stages[{index}] ({stage.name})")) from None

    def length_tasks(self) -> frozenset[str]:
        """Generation tasks whose answers' lengths an objective reads."""
        return frozenset(
            o.generation_length for o in self.objectives or [] if o.generation_length is not None
        )

    def dfs_ends(self) -> tuple[int | None, int | None]:
        """The source indices of a path's embeddings and head (None: searched)."""
        ends = self.dfs.ends if self.dfs is not None else DfsEnds()
        return resolve_ends(ends, self.models.sources)

    @model_validator(mode="after")
    def _method_fits_models(self) -> ExperimentConfig:
        if self.mergekit_genome is not None:
            return self  # mergekit-evolve's rules (_genome_fits)
        if self.dfs is not None:
            try:
                self.dfs_ends()
            except UserError as exc:
                raise ValueError(str(exc)) from None
            return self  # DFS merges no weights: models.base and merge are not used
        method = self.merge.method
        spec = method.spec
        has_base, count = self.models.base is not None, len(self.models.sources)
        try:
            spec.check_models(has_base, count, base="models.base", model="source")
        except UserError as exc:
            raise ValueError(f"merge.method {exc}") from None
        for extra in self.merge.baselines:
            try:
                extra.spec.check_models(has_base, count)
                fits = extra.spec.baseline is not None
            except UserError:
                fits = False
            if not fits:
                raise ValueError(f"merge.baselines: {extra.value} cannot merge these models as a baseline")
        if not spec.genes:
            raise ValueError(f"merge.method {method.value} has no parameter to search (it can be a baseline)")
        searchable = ", ".join(p.name for p in spec.genes)
        for name in [*METHOD_GENES, "weight", "density", "t"]:
            bounds = getattr(self.space, name)
            if bounds is None:
                continue
            param = spec.param(name)
            if param is None or param.gene is None:
                if name in _LEGACY_BOUNDS:  # a snapshot of an older config holds all three (parse_config
                    continue  # refuses them for a method without the gene, where the user wrote them)
                raise ValueError(f"space.{name}: not a searchable parameter of {method.value} ({searchable})")
            low_ok = param.low is None or (
                bounds.min > param.low if param.open_low else bounds.min >= param.low
            )
            if not low_ok or (param.high is not None and bounds.max > param.high):
                raise ValueError(f"space.{name}: {method.value} allows {name} in [{param.low}, {param.high}]")
        return self

    def identity(self) -> dict[str, Any]:
        """The part of the config a resumed run must share: what defines the search and its fitness."""
        data = self.model_dump(mode="json")
        data["optimizer"].pop("budget")
        if data.get("objectives") is None:  # single-objective: as before objectives existed
            data.pop("objectives", None)
        data["evaluation"].pop("batch_size")  # how many at once changes no score (lower it after an OOM)
        for key in ("chat_template", "fewshot_as_multiturn"):  # off: as before they existed
            if not data["evaluation"].get(key):
                data["evaluation"].pop(key, None)
        if data["evaluation"]["fidelity"]["mode"] == "full":  # as before fidelity existed: older runs resume
            data["evaluation"].pop("fidelity")
        data.pop("output")
        data.pop("name")
        if data.get("mergekit_genome") is None:  # as before migrated configs existed
            data.pop("mergekit_genome", None)
        for name in METHOD_GENES:  # unset: as before these existed (older experiments resume)
            if data["space"].get(name, 0) is None:
                data["space"].pop(name)
        for name, legacy in _LEGACY_BOUNDS.items():  # unset: the values older schemas wrote (same identity)
            if data["space"].get(name) is None:
                data["space"][name] = dict(legacy)
        data["merge"].pop("baselines")  # more finals change no candidate
        if not data["merge"]["exclude"]:  # as before exclude existed
            data["merge"].pop("exclude")
        if data["merge"]["calibration"] is None:  # as before calibration existed
            data["merge"].pop("calibration")
        if data["merge"]["rescale"] is None:  # the method's own; older configs dumped rescale: true
            own = self.merge.method.spec.default("rescale")
            data["merge"]["rescale"] = True if own is None else own
        if data.get("dfs") is not None:  # ends as indices (a renamed reference is the same search); model A's
            ends = self.dfs_ends()  # ends, the only ones before ends existed, are left out: those resume
            if ends == (0, 0):
                data["dfs"].pop("ends")
            else:
                data["dfs"]["ends"] = [SEARCH if e is None else e for e in ends]
        runtime = data.pop("runtime")
        data["dtype"] = runtime["dtype"]
        return data

    def identity_hash(self) -> str:
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def end_index(value: EndRef, sources: list[str]) -> int | None:
    """A `dfs.ends` entry as a source index (None for search); the error names the entry's problem."""
    if value == SEARCH:
        return None
    if isinstance(value, int):
        if value >= len(sources):
            raise UserError(f"{value}: there are {len(sources)} sources (indices 0 to {len(sources) - 1})")
        return value
    matches = [i for i, ref in enumerate(sources) if value == ref]
    if not matches:
        labels = [Path(ref.rstrip("/")).name for ref in sources]
        matches = [i for i, label in enumerate(labels) if value == label]
    if len(matches) != 1:
        why = "names two sources" if matches else "is not one of the sources"
        raise UserError(f"{value!r} {why} ({', '.join(sources)}); give an index, a source or {SEARCH}")
    return matches[0]


def resolve_ends(ends: DfsEnds, sources: list[str]) -> tuple[int | None, int | None]:
    indices = []
    for part in ENDS:
        try:
            indices.append(end_index(getattr(ends, part), sources))
        except UserError as exc:
            raise UserError(f"dfs.ends.{part}: {exc}") from None
    return indices[0], indices[1]


def source_labels(refs: list[str]) -> list[str]:
    """Short, unique names for model references (directory or repo name), as reports and finals show them."""
    names = [Path(ref.rstrip("/")).name or ref for ref in refs]
    return [name if names.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(names)]


def _location(loc: tuple) -> str:
    """pydantic's error location as a dotted path, without its union-branch tags."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("cma", "nevergrad", "random") and parts and parts[-1] == "optimizer":
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def format_validation_error(exc: ValidationError, where: str) -> str:
    error = exc.errors()[0]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    path = _location(error["loc"])
    more = f" (and {len(exc.errors()) - 1} more problems)" if len(exc.errors()) > 1 else ""
    return f"{where}: {path + ': ' if path else ''}{message}{more}"


def parse_config(data: Any, where: str = "config") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise UserError(
            f"{where}: expected a mapping of sections (models, merge, ...), got {type(data).__name__}"
        )
    if "merge_method" in data:
        raise UserError(
            f"{where} is a mergekit merge config (it has merge_method): run it with `evomerge merge`; "
            "an experiment config looks like configs/demo.yaml"
        )
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, where)) from None
    _check_gene_bounds(data, config, where)
    runtime = data.get("runtime")
    if isinstance(runtime, dict) and "sources" in runtime:
        import logging

        logging.getLogger("evomerge").warning(
            "%s: runtime.sources is now runtime.placement (the old name still works)", where
        )
    return config


def _check_gene_bounds(data: dict, config: ExperimentConfig, where: str) -> None:
    """`space.weight`, `space.density` and `space.t` as written must be genes of the method searched
    (their schema defaults serve every method, so the schema cannot tell): bounds for a gene the method
    lacks would be silently ignored. Checked on what the user wrote, not on a config snapshot."""
    plans = [] if config.stages else [("space", data.get("space"), config)]
    for i, stage in enumerate(config.stages or []):
        raw = (data.get("stages") or [])[i]
        own = raw.get("space") if isinstance(raw, dict) else None
        plans.append((f"stages[{i}] ({stage.name}).space" if own is not None else "space",
                      own if own is not None else data.get("space"), config.stage_config(i, Path("x"))))  # fmt: skip
    for key, space, planned in plans:
        if not isinstance(space, dict) or planned.dfs is not None or planned.mergekit_genome is not None:
            continue
        spec = planned.merge.method.spec
        for name in ("weight", "density", "t"):
            param = spec.param(name)
            if name in space and (param is None or param.gene is None):
                searchable = ", ".join(p.name for p in spec.genes)
                raise UserError(
                    f"{where}: {key}.{name}: not a searchable parameter of {planned.merge.method.value} ({searchable})"
                )


def load_config(path: str | Path) -> tuple[ExperimentConfig, Path]:
    """The config and the directory its relative model paths may be relative to."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    return parse_config(load_yaml(path), str(path)), path.resolve().parent


def describe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two config dumps."""
    changed = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += describe_changes(a, b, path + ".")
        elif a != b:
            changed.append(path)
    return changed
