"""Read mergekit's merge-config YAML and resolve every parameter for every tensor.

Supported: `models` (+ per-model `parameters`), `base_model`, `merge_method` (every method in the registry,
evomerge/merge/methods/), global `parameters` (each method's own, as its module declares them), scalars, gradient lists (interpolated over layers with
t = layer / (layers - 1); embeddings and head use t = 0), `filter` conditionals (substring of the tensor
name; first match wins), `dtype`, `out_dtype`, `tokenizer_source`. Resolution order and defaults are
mergekit 0.1.5's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.errors import UserError
from evomerge.merge.methods import REGISTRY, Param, TensorParams, parse_method
from evomerge.models.architecture import Family
from evomerge.strict_yaml import load_yaml

Scalar = bool | int | float | str


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Scalar | list[Scalar]
    filter: str | None = None


Setting = Conditional | list[Conditional] | Scalar | list[Scalar]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] | None = None
    layer_range: tuple[int, int] | None = (
        None  # mergekit accepts it here; only the whole model means anything
    )


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] | None = None


class SliceDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    parameters: dict[str, Setting] | None = None
    base_model: str | None = None


class CalibrationTexts(BaseModel):
    """evomerge extension: the texts a data-aware merge (regmean) takes its activation statistics from."""

    model_config = ConfigDict(extra="forbid")
    texts: str  # a file beside the config: one JSON object with a "text" string per line


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] | None = None
    slices: list[SliceDef] | None = None
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    # evomerge extension (mergekit ignores it): accept .bin checkpoints, loaded with weights_only=True
    allow_pickle: bool = False
    calibration: CalibrationTexts | None = None  # evomerge extension (regmean)


def load_merge_config(path: Path) -> MergeConfig:
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    if "modules" in raw:
        raise UserError(f"{path}: 'modules' (multi-module models) is not supported; use 'models' or 'slices'")
    if ("models" in raw) == ("slices" in raw):
        raise UserError(
            f"{path}: give either 'models' or 'slices' (frankenmerge layer ranges), not both or neither"
        )
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(part) for part in err["loc"] if not str(part).startswith(("function-", "union")))
        raise UserError(f"{path}: {loc or 'config'}: {err['msg']}") from None


def _coerce(kind: type, value: Any, name: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"parameter {name} must be true or false, got {value!r}")
    if isinstance(value, bool):
        raise UserError(f"parameter {name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"parameter {name} must be a number, got {value!r}") from None


def evaluate_setting(setting: Setting, tensor: str, t: float, kind: type, name: str) -> Any:
    """mergekit's rule: scalars as they are; numeric lists interpolate at t; filters pick the first match."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return _coerce(kind, setting, name)
    if not setting:
        return None
    if all(not isinstance(item, Conditional) for item in setting):
        values = [_coerce(kind, item, name) for item in setting]
        if kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        if not isinstance(cond, Conditional):
            raise UserError(f"parameter {name}: a list mixes filters and plain values")
        if cond.filter in (None, "*") or (tensor and cond.filter in tensor):
            return evaluate_setting(cond.value, tensor, t, kind, name)
    return None


def resolve(param: Param, scopes: list[dict], tensor: str, t: float) -> Any:
    """The first scope (highest precedence first) that sets `param` for this tensor, evaluated; else None."""
    for scope in scopes:
        if param.name in scope:
            value = evaluate_setting(scope[param.name], tensor, t, param.kind, param.name)
            if value is not None:
                return value
    return None


# options mergekit takes for every method and ignores where the method has no such parameter
# (mergekit-evolve writes both into every config, slerp's included)
ANY_METHOD = ("int8_mask", "normalize")


def check_parameter_names(
    spec, method: str, shared: list[dict], per_model: list[dict], tolerated: tuple[str, ...] = ()
) -> None:
    """Every key a known parameter of the method; per-model scopes hold per-model parameters only.
    `tolerated`: per-model keys mergekit reads elsewhere (a slerp source's weight under tokenizer_source
    blends the embeddings of different tokenizers, which evomerge refuses to merge: no effect here)."""
    known = sorted({p.name for m in REGISTRY.values() for p in m.params})
    per_model = [{k: v for k, v in scope.items() if k not in tolerated} for scope in per_model]
    for scope in shared + per_model:
        for key in scope:
            if key not in known:
                raise UserError(f"unknown parameter {key!r} (known: {', '.join(known)})")
            if spec.param(key) is None and key not in ANY_METHOD:
                raise UserError(f"parameter {key!r} does not apply to {method}")
    for scope in per_model:
        for key in scope:
            if spec.param(key) is None or not spec.param(key).per_input:
                raise UserError(f"parameter {key!r} is global; put it under the top-level parameters")


class ConfigPlan:
    """A parsed config bound to its models: which is the base, which are the inputs, and their parameters."""

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.method = parse_method(config.merge_method)
        self.spec = spec = self.method.spec
        if config.models is None:
            raise UserError("this config has slices; it is planned by SlicePlan")
        refs = [entry.model for entry in config.models]
        if len(set(refs)) != len(refs):
            raise UserError("a model is listed twice in models")
        check_parameter_names(
            spec, self.method.value, [config.parameters or {}], [e.parameters or {} for e in config.models]
        )
        base = config.base_model
        uses_base = spec.needs_base or (spec.optional_base and base is not None)
        self.base: str | None = base if uses_base else None
        if uses_base:
            self.inputs = [r for r in refs if r != base]
        else:  # mergekit merges a listed base_model as one more model
            self.inputs = refs + ([base] if base is not None and base not in refs else [])
        spec.check_models(self.base is not None, len(self.inputs), base="the base_model")
        self._per_model = {e.model: e.parameters or {} for e in config.models}

    @property
    def all_refs(self) -> list[str]:
        return ([self.base] if self.base else []) + self.inputs

    def _resolve(self, param: Param, tensor: str, t: float, model: str | None) -> Any:
        scopes = ([self._per_model.get(model, {})] if model is not None else []) + [
            self.config.parameters or {}
        ]
        return resolve(param, scopes, tensor, t)

    def tensor_params(self, tensor: str, family: Family, num_layers: int) -> TensorParams:
        index = family.layer_index(tensor)
        t = (index / (num_layers - 1) if num_layers > 1 else 1.0) if index is not None else 0.0
        where = f"tensor {tensor}"
        values: dict[str, Any] = {}
        for param in self.spec.params:
            if param.per_input:
                given = [self._resolve(param, tensor, t, model) for model in self.inputs]
                for model, value in zip(self.inputs, given, strict=True):
                    if value is None and param.default is None:
                        raise UserError(f"missing parameter {param.name} for model {model} ({where})")
                values[param.name] = tuple(param.default if v is None else v for v in given)
            else:
                value = self._resolve(param, tensor, t, None)
                if value is None and param.default is None:
                    raise UserError(f"missing parameter {param.name} for {self.method.value} ({where})")
                values[param.name] = param.default if value is None else value
        return self.spec.tensor_params(values, len(self.inputs), where)
