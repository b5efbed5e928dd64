"""What a merge method is, besides its kernel: its parameters (mergekit's names, scopes and defaults),
which of them the search may tune, what it precomputes, its fast path, and its default merge.

A method is one module in this package that defines `METHOD = MergeMethod(...)`; the registry
(`evomerge.merge.methods`) finds it. Everything that depends on the method (the engine, the genome, config
checks, `evomerge merge`, export, the finals) reads the `MergeMethod`, never the method's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    import torch

Value = float | bool


@dataclass(frozen=True)
class Param:
    """One parameter, as mergekit spells it. `per_input`: one value per merged model (mergekit's
    NON_BASE/INPUT scope), else one for the whole merge. `gene`: the default search range when the search
    may tune it (the config's `space.<name>` overrides it); None: fixed at its value or default."""

    name: str
    kind: type = float
    per_input: bool = False
    default: Value | None = None  # None: required
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    gene: tuple[float, float] | None = None

    def check(self, value: Any, where: str) -> None:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise UserError(f"{where}: {self.name} must be true or false, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"{where}: {self.name} must be a finite number, got {value!r}")
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and value > self.high
        if below or above:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            interval = f"{'(' if self.open_low else '['}{low}, {high}]"
            raise UserError(f"{where}: {self.name} must be in {interval}, got {value}")


@dataclass(frozen=True)
class TensorParams:
    """Every parameter of the method for one tensor: per-input ones as tuples (one per merged model, in
    order), the others as scalars; `seed` keys the masks of random methods."""

    values: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


# The fast path: (kernels, out, base, models, params, tensor name, precomputed state) -> None, writing the
# merge into `out` in place. `kernels` wraps a pure kernel function (torch.compile'd or eager).
Fast = Callable[..., None]
Exact = Callable[[str, "torch.Tensor | None", Sequence["torch.Tensor"], TensorParams], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method. `exact(name, base, models, params)` is the reference (float32 result, what
    `evomerge merge` writes); `fast` the search's in-place path (None: the exact kernel, copied in);
    `precompute(name, base, models, eager)` what a tensor needs whatever the candidate, computed once;
    `baseline(n)` the parameters of the method's default merge of n models, scored in the finals (None:
    no default merge)."""

    name: str
    summary: str
    params: tuple[Param, ...]
    exact: Exact
    needs_base: bool = True
    optional_base: bool = False  # uses a base when one is given (multislerp), else merges the models
    inputs: int | None = None  # exactly this many merged models (besides the base), when fixed
    min_inputs: int = 1
    fast: Fast | None = None
    precompute: Callable[..., Any] | None = None
    baseline: Callable[[int], dict[str, Value]] | None = None
    finals: int | None = None  # its default merge is scored in every experiment's finals, in this order
    random: bool = False  # draws masks from params.seed (results differ from mergekit's own draws)
    check: Callable[[TensorParams, str], None] | None = None  # constraints between parameters
    repair: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # a searched group made valid
    # bytes `precompute` keeps for one tensor of (numel, row length) and n merged models: the memory plan
    state_bytes: Callable[[int, int, int], int] | None = None
    in_mergekit: bool = True  # mergekit 0.1.5 has it (export writes a config mergekit-yaml can run)
    calibrated: bool = False  # merges from activation statistics (RegMean): the worker computes them first
    # (name, base, models, params, that tensor's statistics or None) -> the merge: `exact` of such a method
    exact_calibrated: Callable[..., Any] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def genes(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.gene is not None)

    def default(self, name: str) -> Value | None:
        p = self.param(name)
        return None if p is None else p.default

    def check_models(
        self, has_base: bool, count: int, *, base: str = "a base model", model: str = "model"
    ) -> None:
        """UserError (for the caller to place) when this method cannot merge `count` models besides the
        base (`has_base`: a base is given). The one statement of the fact, for the experiment config, the
        engine, mergekit configs and slices; `base` and `model` are how the caller's config names them."""
        if self.needs_base and not has_base:
            raise UserError(f"{self.name} needs {base}")
        if self.inputs is not None and count != self.inputs:
            if self.needs_base or (self.optional_base and has_base):
                n = "one" if self.inputs == 1 else str(self.inputs)
                raise UserError(
                    f"{self.name} merges {base} with exactly {n} {model}{'s' * (self.inputs != 1)}"
                )
            raise UserError(f"{self.name} takes exactly {self.inputs} {model}(s), got {count}")
        if count < self.min_inputs:
            besides = f" besides {base}" if self.needs_base or (self.optional_base and has_base) else ""
            plural = "s" * (self.min_inputs != 1)
            raise UserError(f"{self.name} needs at least {self.min_inputs} {model}{plural}{besides}")

    def tensor_params(self, values: Mapping[str, Any], count: int, where: str, seed: int = 0) -> TensorParams:
        """Fill defaults, check every value and the method's own constraints."""
        out: dict[str, Any] = {}
        for p in self.params:
            value = values.get(p.name)
            if p.per_input:
                if value is None:
                    if p.default is None:
                        raise UserError(f"{where}: missing parameter {p.name} ({self.name})")
                    value = (p.default,) * count
                value = tuple(value)
                if len(value) != count:
                    raise UserError(f"{where}: {p.name} has {len(value)} values for {count} models")
                for v in value:
                    p.check(v, where)
            else:
                if value is None:
                    if p.default is None:
                        raise UserError(f"{where}: missing parameter {p.name} ({self.name})")
                    value = p.default
                p.check(value, where)
            out[p.name] = value
        params = TensorParams(out, seed)
        if self.check is not None:
            self.check(params, where)
        return params


def dare_keys(seed: int, tensor: str, count: int) -> list[int]:
    """One mask key per task vector, from the candidate's seed and the tensor's name (never global RNG)."""
    from evomerge.merge.kernels.rng import derive_key

    return [derive_key(seed, tensor, j) for j in range(count)]


def tie_keys(tensor: str, count: int) -> list[int]:
    """Keys for the fast TIES path's tie-breaking among equal magnitudes; fixed per tensor."""
    from evomerge.merge.kernels.rng import derive_key

    return [derive_key("ties-tie-break", tensor, j) for j in range(count)]
