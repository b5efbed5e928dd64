"""Parameter-space (PS) genome <-> recipe.

A genome is a flat vector in [0, 1]^n, the box every optimizer searches; each gene maps linearly onto the
range of its parameter (the method's searchable ones: weight, density, gamma, epsilon, t...; `space.<name>`
in the config or the method's default range). Genes are laid out per *block* of tensor groups (the
embeddings, k consecutive layers, optionally their attention and MLP halves apart, the head), and within a
block: shared parameters first (slerp's t), then per source its parameters in the method's order. Groups without genes
take the method's default merge. All genes at 0.5 is the search's starting point (as in Sakana's PS search).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.config import SpaceSpec
from evomerge.errors import UserError
from evomerge.merge.methods import Method
from evomerge.merge.recipe import GroupParams, Recipe
from evomerge.models.architecture import EMBED, HEAD


def default_params(method: Method, num_sources: int) -> GroupParams:
    """A method's default merge, the baseline the search must beat (the method's `baseline`: e.g. task
    vectors added at weight 1, TIES/DARE keeping half of each, SLERP half-way, linear the plain average)."""
    spec = method.spec
    values = spec.baseline(num_sources) if spec.baseline is not None else {}
    return GroupParams({k: (v,) * num_sources if spec.param(k).per_input else v for k, v in values.items()})


@dataclass(frozen=True)
class Block:
    name: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Gene:
    block: str
    source: int | None  # None for a parameter shared by all models (slerp's t)
    kind: str  # the parameter's mergekit name: weight | density | gamma | epsilon | t ...
    low: float
    high: float

    def label(self, source_names: list[str]) -> str:
        who = f"/{source_names[self.source]}" if self.source is not None else ""
        return f"{self.block}{who}/{self.kind}"


class Space:
    def __init__(
        self, spec: SpaceSpec, method: Method, num_sources: int, num_layers: int, *, seed: int = 0
    ) -> None:
        self.spec, self.method, self.num_sources, self.seed = spec, method, num_sources, seed
        self.blocks = _blocks(spec, num_layers)
        self.all_groups = group_names(num_layers, spec.split)
        searched = method.spec.genes
        if not searched:
            raise UserError(f"merge.method {method.value} has no parameter to search")
        genes = []
        for block in self.blocks:
            for p in searched:
                if not p.per_input:
                    genes.append(Gene(block.name, None, p.name, *spec.range(p)))
            for j in range(num_sources):
                for p in searched:
                    if p.per_input:
                        genes.append(Gene(block.name, j, p.name, *spec.range(p)))
        if not genes:
            raise UserError("space: no genes (no layers and embeddings: false)")
        self.genes = tuple(genes)
        self.default = default_params(method, num_sources)

    @property
    def size(self) -> int:
        return len(self.genes)

    def start(self) -> np.ndarray:
        return np.full(self.size, 0.5)

    def decode(
        self, genome, *, seed: int | None = None, normalize: bool | None = None, rescale: bool | None = None
    ) -> Recipe:
        """Genes outside [0, 1] are clipped (optimizers may step outside the box)."""
        x = np.clip(np.asarray(genome, dtype=float), 0.0, 1.0)
        if x.shape != (self.size,):
            raise ValueError(f"genome has {x.shape} genes, space has {self.size}")
        values: dict[str, dict[str, list[float]]] = {}
        for gene, unit in zip(self.genes, x, strict=True):
            value = gene.low + float(unit) * (gene.high - gene.low)
            values.setdefault(gene.block, {}).setdefault(gene.kind, []).append(value)
        groups = {name: self.default for name in self.all_groups}
        spec = self.method.spec
        for block in self.blocks:
            v = {k: tuple(vs) if spec.param(k).per_input else vs[0] for k, vs in values[block.name].items()}
            if spec.repair is not None:  # e.g. DELLA: epsilon within its density's margin
                defaults = {p.name: (p.default,) * self.num_sources for p in spec.params
                            if p.per_input and p.default is not None and p.name not in v}  # fmt: skip
                v = spec.repair({**defaults, **v})
            params = GroupParams(v)
            for group in block.groups:
                groups[group] = params
        return Recipe(
            self.method,
            groups,
            normalize=normalize,
            rescale=rescale,
            seed=self.seed if seed is None else seed,
        )

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe (each block read from its first group); values outside a gene's range clip."""
        x = []
        for gene in self.genes:
            block = next(b for b in self.blocks if b.name == gene.block)
            value = recipe.groups[block.groups[0]].get(gene.kind)
            if gene.source is not None:
                value = value[gene.source]
            span = gene.high - gene.low
            x.append(0.5 if span == 0 else (value - gene.low) / span)
        return np.clip(np.array(x, dtype=float), 0.0, 1.0)

    def source_genome(self, source: int) -> np.ndarray:
        """The genome nearest to one source alone: its weight genes at the top of their range, the other
        sources' at the bottom, density-like genes at the top (keep everything), others mid-range."""
        x = []
        for gene in self.genes:
            if gene.kind == "weight":
                x.append(1.0 if gene.source == source else 0.0)
            elif gene.kind == "density":
                x.append(1.0)
            else:
                x.append(0.5)
        return np.array(x, dtype=float)

    def default_popsize(self) -> int:
        return cma_popsize(self.size)


def cma_popsize(genes: int) -> int:
    """cma's own default population for a genome of this size (4 + floor(3 ln n)), as every space uses."""
    return 4 + int(3 * np.log(genes))


def group_names(num_layers: int, split: bool) -> list[str]:
    layers = [
        g
        for i in range(num_layers)
        for g in ((f"layers.{i}.attn", f"layers.{i}.mlp") if split else (f"layers.{i}",))
    ]
    return [EMBED, *layers, HEAD]


def _blocks(spec: SpaceSpec, num_layers: int) -> list[Block]:
    k = spec.layers_per_group
    blocks = [Block(EMBED, (EMBED,))] if spec.embeddings else []
    for start in range(0, num_layers, k):
        span = range(start, min(start + k, num_layers))
        name = f"layers.{start}" if len(span) == 1 else f"layers.{span[0]}-{span[-1]}"
        if spec.split:
            for part in ("attn", "mlp"):
                blocks.append(Block(f"{name}.{part}", tuple(f"layers.{i}.{part}" for i in span)))
        else:
            blocks.append(Block(name, tuple(f"layers.{i}" for i in span)))
    if spec.embeddings:
        blocks.append(Block(HEAD, (HEAD,)))
    return blocks
