"""mergekit-evolve's genotype as a search space (a migrated mergekit-evolve config).

mergekit-evolve runs CMA-ES unbounded on the raw genotype (x0 its initial genotype, sigma0 1/6); evomerge's
optimizers search the unit box, so each gene maps linearly onto a range of the genotype: weights [0, 1]
([-1, 1] with allow_negative_weights), densities [0, 1], slerp's selection weights [0, 1] (`space.<gene>`
overrides a range). With ranges of width 1 a step in the box is the same step in the genotype, so
mergekit-evolve's sigma0 carries over unchanged (`evomerge import` divides it by the width otherwise).
What the box leaves out mergekit-evolve folds away anyway (|w|, densities clamped to [0, 1]) except weights
above 1 of a method that does not normalize (task_arithmetic): widen space.weight to reach them.
Candidates are the merge configs themselves (journaled as `{"kind": "mergekit", "config": ...}`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.config import ExperimentConfig
from evomerge.errors import UserError
from evomerge.merge.recipe import ConfigRecipe
from evomerge.mergekit_evolve import METHOD_PARAMS, EvolveGenome
from evomerge.search.space import cma_popsize, group_names


def gene_range(config: ExperimentConfig, name: str) -> tuple[float, float]:
    given = getattr(config.space, name, None)
    if given is not None:
        return given.min, given.max
    negative = name != "density" and config.mergekit_genome.allow_negative_weights
    return (-1.0, 1.0) if negative else (0.0, 1.0)


class EvolveSpace:
    def __init__(self, config: ExperimentConfig, num_layers: int) -> None:
        self.genome: EvolveGenome = config.evolve_genome()
        self.num_layers = num_layers
        self.all_groups = group_names(num_layers, split=False)  # the finals' default merges use them
        try:
            self.shape = self.genome.shape(num_layers)
        except ValueError as exc:
            raise UserError(f"mergekit_genome: {exc}") from None
        self.random_init = config.mergekit_genome.random_init
        self.seed = config.optimizer.seed
        params = METHOD_PARAMS[self.genome.merge_method]
        ranges = np.array([gene_range(config, p) for p in params])  # (params, 2)
        self.low = np.broadcast_to(ranges[:, 0], self.shape).reshape(-1).copy()
        self.high = np.broadcast_to(ranges[:, 1], self.shape).reshape(-1).copy()
        groups, models, sets, _ = self.shape
        step = self.genome.layer_granularity or num_layers
        filters = [*(self.genome.filters or []), "rest"]
        self.labels = [
            f"layers {k * step}-{(k + 1) * step - 1}/{self.genome.models[i]}/{filters[s]}/{p}"
            for k in range(groups) for i in range(models) for s in range(sets) for p in params
        ]  # fmt: skip

    @property
    def size(self) -> int:
        return len(self.low)

    def to_unit(self, genotype) -> np.ndarray:
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        return np.clip((np.asarray(genotype, dtype=float).reshape(-1) - self.low) / span, 0.0, 1.0)

    def genotype(self, genome) -> np.ndarray:
        x = np.clip(np.asarray(genome, dtype=float), 0.0, 1.0)
        if x.shape != (self.size,):
            raise ValueError(f"genome has {x.shape} genes, space has {self.size}")
        return self.low + x * (self.high - self.low)

    def initial(self) -> np.ndarray:
        """mergekit-evolve's initial genotype (weights 1/models, the other genes 1), in the box."""
        return self.to_unit(self.genome.initial_genotype(self.num_layers).numpy())

    def start(self) -> np.ndarray:
        """Where CMA-ES starts: the initial genotype, or with random_init a uniform one (mergekit-evolve's
        torch.rand, here drawn from optimizer.seed so that a resumed run starts where the first did)."""
        if self.random_init:
            return self.to_unit(np.random.default_rng([self.seed, 28]).random(self.size))
        return self.initial()

    def decode(self, genome) -> dict[str, Any]:
        """The candidate: the merge config the genotype stands for, as plain data."""
        return ConfigRecipe(self.genome.merge_config(self.genotype(genome), self.num_layers)).to_dict()

    def source_genome(self, source: int) -> np.ndarray:
        """The genome nearest to one model alone: its weights at 1, the others' at 0, densities at 1."""
        g = np.zeros(self.shape)
        g[:, source, :, 0] = 1.0
        g[:, :, :, 1:] = 1.0
        return self.to_unit(g)

    def default_popsize(self) -> int:
        return cma_popsize(self.size)  # which mergekit-evolve's CMA-ES uses too
