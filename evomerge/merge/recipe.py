"""A recipe: merge parameters per tensor group (embeddings, each layer or its attention/MLP halves, head).

This is what the search's genome decodes into and what the engine applies. `tensor_params` is the one
place where a group's parameters become a tensor's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import UserError
from evomerge.merge.methods import Method, TensorParams
from evomerge.models.architecture import Family

# journals written before the method registry spelled the searched values this way
_OLD_NAMES = {"weights": "weight", "densities": "density"}


def _plain(value: Any) -> Any:
    return tuple(float(v) for v in value) if isinstance(value, list | tuple) else value


class GroupParams:
    """A group's values by mergekit parameter name: per-model ones as tuples (`weight`, `density`,
    `gamma`, ...), the others as numbers (`t`). Missing ones take the method's defaults."""

    __slots__ = ("values",)

    def __init__(self, values: Mapping[str, Any] | None = None, **named: Any) -> None:
        merged = {**(values or {}), **named}
        self.values: dict[str, Any] = {k: _plain(v) for k, v in merged.items()}

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    @property
    def weights(self) -> tuple[float, ...]:
        return self.values.get("weight", ())

    @property
    def densities(self) -> tuple[float, ...]:
        return self.values.get("density", ())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupParams) and self.values == other.values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.values.items())))

    def __repr__(self) -> str:
        return f"GroupParams({self.values})"


@dataclass
class Recipe:
    method: Method
    groups: dict[str, GroupParams]
    normalize: bool | None = None
    lam: float = 1.0
    rescale: bool | None = None
    seed: int = 0
    exclude: tuple[str, ...] = ()  # tensor names or substrings the method's `exclude` is true for
    split: bool = field(init=False)

    def __post_init__(self) -> None:
        self.split = any(name.endswith((".attn", ".mlp")) for name in self.groups)

    def shared(self) -> dict[str, Any]:
        """The recipe-wide settings the method has (None: the method's default)."""
        spec = self.method.spec
        given = {"normalize": self.normalize, "lambda": self.lam, "rescale": self.rescale}
        return {k: v for k, v in given.items() if v is not None and spec.param(k) is not None}

    def tensor_params(self, names: Iterable[str], family: Family) -> dict[str, TensorParams]:
        spec, shared = self.method.spec, self.shared()
        excludes = self.exclude and spec.param("exclude") is not None
        out, by_group = {}, {}
        for name in names:
            group = family.group(name, self.split)
            if group not in self.groups:
                raise UserError(f"recipe has no parameters for group {group} (tensor {name})")
            key = (group, excludes and any(part in name for part in self.exclude))
            if key not in by_group:
                values = {**self.groups[group].values, **shared}
                if excludes:
                    values["exclude"] = key[1]
                by_group[key] = spec.tensor_params(values, _count(values), f"group {group}", self.seed)
            out[name] = by_group[key]
        return out

    @classmethod
    def uniform(cls, method: Method, group_names: Iterable[str], weights=(), densities=(), **kw) -> Recipe:
        """The same parameters for every group (e.g. a method's default merge); `values` for any other."""
        values = dict(kw.pop("values", {}))
        if weights:
            values["weight"] = tuple(weights)
        if densities:
            values["density"] = tuple(densities)
        if "t" in kw:
            values["t"] = kw.pop("t")
        params = GroupParams(values)
        return cls(method, {name: params for name in group_names}, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value, "normalize": self.normalize, "lambda": self.lam,
            "rescale": self.rescale, "seed": self.seed,
            "groups": {name: {k: list(v) if isinstance(v, tuple) else v for k, v in g.values.items()}
                       for name, g in self.groups.items()},
        } | ({"exclude": list(self.exclude)} if self.exclude else {})  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        method = Method(data["method"])
        groups = {}
        for name, g in data["groups"].items():
            # old journals wrote weights/densities/t for every method, empty or unused ones included
            values = {_OLD_NAMES.get(k, k): v for k, v in g.items() if v != []}
            groups[name] = GroupParams({k: v for k, v in values.items() if method.spec.param(k) is not None})
        return cls(method, groups, data.get("normalize"), data.get("lambda", 1.0),
                   data.get("rescale"), data.get("seed", 0), tuple(data.get("exclude", ())))  # fmt: skip


@dataclass(frozen=True)
class PathRecipe:
    """A data-flow candidate: the layers a token passes through, as (model, layer) slots in order, and the
    scale applied to the hidden state at each hop; `ends`: the sources of the embeddings and of the final
    norm + lm_head. Journaled with `"kind": "dfs"`, which is how a stored recipe says it is one
    (parameter-space recipes have no kind); ends are written only when they are not model A's."""

    path: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]
    ends: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if len(self.path) != len(self.scales):
            raise UserError(f"data-flow recipe: {len(self.path)} layers but {len(self.scales)} scales")

    def to_dict(self) -> dict[str, Any]:
        data = {"kind": "dfs", "path": [list(slot) for slot in self.path], "scales": list(self.scales)}
        if self.ends != (0, 0):
            data["ends"] = list(self.ends)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PathRecipe:
        path = tuple((int(model), int(layer)) for model, layer in data["path"])
        embeddings, head = data.get("ends", (0, 0))
        return cls(path, tuple(float(s) for s in data["scales"]), (int(embeddings), int(head)))


CONFIG_KIND = "mergekit"


@dataclass(frozen=True)
class ConfigRecipe:
    """A mergekit merge config as the candidate (a migrated mergekit-evolve run, whose genotype means a
    config): journaled as `{"kind": "mergekit", "config": {...}}`, the config as mergekit-evolve writes it."""

    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": CONFIG_KIND, "config": self.config}


def parse_recipe(data: dict[str, Any]) -> Recipe | PathRecipe | ConfigRecipe:
    """A journaled recipe as what it is: the one place that reads a stored recipe's kind."""
    kind = data.get("kind")
    if kind == CONFIG_KIND:
        return ConfigRecipe(data["config"])
    return PathRecipe.from_dict(data) if kind == "dfs" else Recipe.from_dict(data)


def _count(values: Mapping[str, Any]) -> int:
    """How many merged models a group's values speak for (slerp's t alone: one)."""
    return next((len(v) for v in values.values() if isinstance(v, tuple)), 1)
