"""Data-flow-space (DFS) genome -> layer path.

The slots are every layer of the sources in order (model A's, then B's, ...), repeated r times: T = M·r.
A gene per slot is its inclusion indicator (on the unit box: included above 0.5); the scales are a gene
per slot, or Sakana's M x M matrix indexed by (global index of the previous hop's layer, this hop's
layer), the first hop taking scale 1. Genes map linearly onto the scale bounds (0.5 -> the middle).
Last, one gene per searched end (`dfs.ends: search`): the unit interval cut into one bin per source,
starting in model A's bin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.config import DfsSpec
from evomerge.errors import UserError
from evomerge.merge.recipe import PathRecipe
from evomerge.search.space import cma_popsize

INCLUDE = 0.5
A_PATH_START = 0.75  # indicator start for model A's own layers (others start at 0.25): with sigma0 1/6,
# each flips with probability ~7%, so A's path is the most likely first path


class DfsSpace:
    def __init__(
        self, spec: DfsSpec, layers: list[int], ends: tuple[int | None, int | None] = (0, 0)
    ) -> None:
        """`ends`: the source of the embeddings and of the head, None where a gene chooses it."""
        self.spec = spec
        self.ends = ends
        self.sources = len(layers)
        self.end_genes = sum(e is None for e in ends)
        self.layout = [(s, i) for s, count in enumerate(layers) for i in range(count)]
        self.m = len(self.layout)
        self.slots = self.layout * spec.repeats
        self.t = len(self.slots)
        self.a_layers = layers[0]
        self.scale_genes = self.t if spec.scale == "scalar" else self.m * self.m
        if spec.max_layers is not None and spec.min_layers > self.t:
            raise UserError(f"dfs.min_layers {spec.min_layers} exceeds the {self.t} slots")

    @property
    def size(self) -> int:
        return self.t + self.scale_genes + self.end_genes

    def default_popsize(self) -> int:
        return cma_popsize(self.size)

    def start(self) -> np.ndarray:
        x = np.full(self.size, 0.5)
        if self.spec.init_a_path:
            x[: self.t] = 0.25
            x[: self.a_layers] = A_PATH_START
        else:
            x[: self.t] = 0.5
        lo, hi = self.spec.scale_bounds.min, self.spec.scale_bounds.max
        if hi > lo and lo <= 1.0 <= hi:
            x[self.t : self.t + self.scale_genes] = (1.0 - lo) / (hi - lo)  # scales start at 1
        x[self.t + self.scale_genes :] = 0.5 / self.sources  # the middle of model A's bin
        return x

    def decode(self, genome, **_: Any) -> PathRecipe:
        x = np.clip(np.asarray(genome, dtype=float), 0.0, 1.0)
        if x.shape != (self.size,):
            raise ValueError(f"genome has {x.shape} genes, space has {self.size}")
        ind, sc = x[: self.t], x[self.t : self.t + self.scale_genes]
        end_genes = iter(x[self.t + self.scale_genes :])
        ends = tuple(
            min(int(next(end_genes) * self.sources), self.sources - 1) if e is None else e for e in self.ends
        )
        chosen = [k for k in range(self.t) if ind[k] > INCLUDE]
        spec = self.spec
        if spec.max_layers is not None and len(chosen) > spec.max_layers:
            keep = sorted(sorted(chosen, key=lambda k: -ind[k])[: spec.max_layers])
            chosen = keep
        if len(chosen) < spec.min_layers:
            extra = sorted((k for k in range(self.t) if k not in chosen), key=lambda k: -ind[k])
            chosen = sorted(chosen + extra[: spec.min_layers - len(chosen)])
        lo, hi = spec.scale_bounds.min, spec.scale_bounds.max
        to_scale = lambda u: lo + float(u) * (hi - lo)  # noqa: E731
        hops: list[tuple[tuple[int, int], float]] = []
        previous = None
        for k in chosen:
            if spec.scale == "scalar":
                scale = to_scale(sc[k])
            else:
                here = k % self.m
                scale = 1.0 if previous is None else to_scale(sc[previous * self.m + here])
                previous = here
            hops.append((self.slots[k], scale))
        if spec.keep_ends:
            first, last = (0, 0), (0, self.a_layers - 1)
            if not hops or hops[0][0] != first:
                hops.insert(0, (first, 1.0))
            if hops[-1][0] != last:
                hops.append((last, 1.0))
        return PathRecipe(tuple(slot for slot, _ in hops), tuple(s for _, s in hops), ends)
