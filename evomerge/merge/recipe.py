"""A recipe: merge parameters per tensor group (embeddings, each layer or its attention/MLP halves, head).

This is what the search's genome decodes into and what the engine applies. `tensor_params` is the one
place where a group's parameters become a tensor's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from evomerge.errors import UserError
from evomerge.merge.methods import Method, TensorParams
from evomerge.models.architecture import Family


@dataclass(frozen=True)
class GroupParams:
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    t: float = 0.5


@dataclass
class Recipe:
    method: Method
    groups: dict[str, GroupParams]
    normalize: bool | None = None
    lam: float = 1.0
    rescale: bool = True
    seed: int = 0
    split: bool = field(init=False)

    def __post_init__(self) -> None:
        self.split = any(name.endswith((".attn", ".mlp")) for name in self.groups)

    def tensor_params(self, names: Iterable[str], family: Family) -> dict[str, TensorParams]:
        normalize = self.method.default_normalize if self.normalize is None else self.normalize
        out = {}
        for name in names:
            group = family.group(name, self.split)
            if group not in self.groups:
                raise UserError(f"recipe has no parameters for group {group} (tensor {name})")
            g = self.groups[group]
            params = TensorParams(
                weights=g.weights, densities=g.densities if self.method.uses_density else (), t=g.t,
                normalize=normalize, lam=self.lam, rescale=self.rescale, seed=self.seed,
            )  # fmt: skip
            params.validate(self.method, f"group {group}")
            out[name] = params
        return out

    @classmethod
    def uniform(
        cls, method: Method, group_names: Iterable[str], weights, densities=(), t: float = 0.5, **kw
    ) -> Recipe:
        """The same parameters for every group (e.g. a method's default merge)."""
        params = GroupParams(tuple(weights), tuple(densities), t)
        return cls(method, {name: params for name in group_names}, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value, "normalize": self.normalize, "lambda": self.lam,
            "rescale": self.rescale, "seed": self.seed,
            "groups": {name: asdict(g) for name, g in self.groups.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        groups = {
            name: GroupParams(tuple(g.get("weights", ())), tuple(g.get("densities", ())), g.get("t", 0.5))
            for name, g in data["groups"].items()
        }
        return cls(Method(data["method"]), groups, data.get("normalize"), data.get("lambda", 1.0),
                   data.get("rescale", True), data.get("seed", 0))  # fmt: skip
