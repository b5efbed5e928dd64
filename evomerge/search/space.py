"""Parameter-space (PS) genome <-> recipe.

A genome is a flat vector in [0, 1]^n, the box every optimizer searches; each gene maps linearly onto the
range of its kind (weight, density, t) from the config. Genes are laid out per *block* of tensor groups
(the embeddings, k consecutive layers, optionally their attention and MLP halves apart, the head), and
within a block per source: weight, then density for the methods that trim or drop. Groups without genes
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

DEFAULT_DENSITY = 0.5


def default_params(method: Method, num_sources: int) -> GroupParams:
    """A method's default merge, the baseline the search must beat: task vectors added at weight 1
    (TIES normalizes by the agreeing weights, so this is their mean), TIES/DARE keeping half of each
    task vector, SLERP half-way, linear the plain average."""
    if method is Method.slerp:
        return GroupParams(t=0.5)
    if method is Method.linear:
        return GroupParams(weights=(1.0 / num_sources,) * num_sources)
    densities = (DEFAULT_DENSITY,) * num_sources if method.uses_density else ()
    return GroupParams(weights=(1.0,) * num_sources, densities=densities)


@dataclass(frozen=True)
class Block:
    name: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class Gene:
    block: str
    source: int | None  # None for slerp's t
    kind: str  # weight | density | t
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
        self.all_groups = _groups(num_layers, spec.split)
        genes = []
        for block in self.blocks:
            if method is Method.slerp:
                genes.append(Gene(block.name, None, "t", spec.t.min, spec.t.max))
                continue
            for j in range(num_sources):
                genes.append(Gene(block.name, j, "weight", spec.weight.min, spec.weight.max))
                if method.uses_density:
                    genes.append(Gene(block.name, j, "density", spec.density.min, spec.density.max))
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
        self, genome, *, seed: int | None = None, normalize: bool | None = None, rescale: bool = True
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
        for block in self.blocks:
            v = values[block.name]
            params = GroupParams(
                weights=tuple(v.get("weight", ())), densities=tuple(v.get("density", ())),
                t=v["t"][0] if "t" in v else 0.5,
            )  # fmt: skip
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
            params = recipe.groups[block.groups[0]]
            if gene.kind == "t":
                value = params.t
            else:
                value = (params.weights if gene.kind == "weight" else params.densities)[gene.source]
            span = gene.high - gene.low
            x.append(0.5 if span == 0 else (value - gene.low) / span)
        return np.clip(np.array(x, dtype=float), 0.0, 1.0)

    def default_popsize(self) -> int:
        return 4 + int(3 * np.log(self.size))


def _groups(num_layers: int, split: bool) -> list[str]:
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
