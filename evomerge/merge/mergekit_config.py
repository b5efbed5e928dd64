"""Read mergekit's merge-config YAML and resolve every parameter for every tensor.

Supported: `models` (+ per-model `parameters`), `base_model`, `merge_method` (linear, task_arithmetic, ties,
dare_linear, dare_ties, slerp), global `parameters`, scalars, gradient lists (interpolated over layers with
t = layer / (layers - 1); embeddings and head use t = 0), `filter` conditionals (substring of the tensor
name; first match wins), `dtype`, `out_dtype`, `tokenizer_source`. Resolution order and defaults are
mergekit 0.1.5's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.errors import UserError
from evomerge.merge.methods import Method, TensorParams, parse_method
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


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry]
    merge_method: str
    base_model: str | None = None
    parameters: dict[str, Setting] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    # evomerge extension (mergekit ignores it): accept .bin checkpoints, loaded with weights_only=True
    allow_pickle: bool = False


# parameter -> (kind, scope): "shared" parameters are global; "input" ones can be given per model.
_PARAMS = {
    "weight": (float, "input"),
    "density": (float, "input"),
    "t": (float, "shared"),
    "normalize": (bool, "shared"),
    "lambda": (float, "shared"),
    "rescale": (bool, "shared"),
    "int8_mask": (bool, "shared"),  # accepted for compatibility; masks are always bool here
}
_METHOD_PARAMS = {
    Method.linear: {"weight", "normalize"},
    Method.task_arithmetic: {"weight", "normalize", "lambda", "int8_mask", "density"},
    Method.ties: {"weight", "density", "normalize", "lambda", "int8_mask"},
    Method.dare_linear: {"weight", "density", "normalize", "lambda", "int8_mask", "rescale"},
    Method.dare_ties: {"weight", "density", "normalize", "lambda", "int8_mask", "rescale"},
    Method.slerp: {"t"},
}


def load_merge_config(path: Path) -> MergeConfig:
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    for key in ("slices", "modules"):
        if key in raw:
            raise UserError(
                f"{path}: '{key}' (frankenmerge layer stacking) is not supported by evomerge merge yet; use 'models'"
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


class ConfigPlan:
    """A parsed config bound to its models: which is the base, which are the inputs, and their parameters."""

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.method = parse_method(config.merge_method)
        refs = [entry.model for entry in config.models]
        if len(set(refs)) != len(refs):
            raise UserError("a model is listed twice in models")
        allowed = _METHOD_PARAMS[self.method]
        for scope in [config.parameters or {}] + [e.parameters or {} for e in config.models]:
            for key in scope:
                if key not in _PARAMS:
                    raise UserError(f"unknown parameter {key!r} (known: {', '.join(sorted(_PARAMS))})")
                if key not in allowed:
                    raise UserError(f"parameter {key!r} does not apply to {self.method.value}")
        for entry in config.models:
            for key in entry.parameters or {}:
                if _PARAMS[key][1] == "shared":
                    raise UserError(f"parameter {key!r} is global; put it under the top-level parameters")
        base = config.base_model
        if self.method.uses_base:
            if base is None:
                raise UserError(f"{self.method.value} needs a base_model")
            self.base: str | None = base
            self.inputs = [r for r in refs if r != base]
            if self.method is Method.slerp and len(self.inputs) != 1:
                raise UserError("slerp merges exactly two models: the base_model and one other")
            if not self.inputs:
                raise UserError("no models to merge besides the base_model")
        else:
            self.base = None
            self.inputs = refs + ([base] if base is not None and base not in refs else [])
        self._per_model = {e.model: e.parameters or {} for e in config.models}

    @property
    def all_refs(self) -> list[str]:
        return ([self.base] if self.base else []) + self.inputs

    def _resolve(self, name: str, tensor: str, t: float, model: str | None) -> Any:
        kind, _ = _PARAMS[name]
        scopes = ([self._per_model.get(model, {})] if model is not None else []) + [
            self.config.parameters or {}
        ]
        for scope in scopes:
            if name in scope:
                value = evaluate_setting(scope[name], tensor, t, kind, name)
                if value is not None:
                    return value
        return None

    def tensor_params(self, tensor: str, family: Family, num_layers: int) -> TensorParams:
        index = family.layer_index(tensor)
        t = (index / (num_layers - 1) if num_layers > 1 else 1.0) if index is not None else 0.0
        where = f"tensor {tensor}"
        weights, densities = [], []
        for model in self.inputs:
            if self.method is Method.slerp:
                break
            weight = self._resolve("weight", tensor, t, model)
            if weight is None:
                raise UserError(f"missing parameter weight for model {model} ({where})")
            weights.append(weight)
            density = self._resolve("density", tensor, t, model)
            densities.append(1.0 if density is None else density)
        normalize = self._resolve("normalize", tensor, t, None)
        lam = self._resolve("lambda", tensor, t, None)
        rescale = self._resolve("rescale", tensor, t, None)
        slerp_t = self._resolve("t", tensor, t, None)
        if self.method is Method.slerp and slerp_t is None:
            raise UserError(f"missing parameter t for slerp ({where})")
        params = TensorParams(
            weights=tuple(weights),
            densities=tuple(densities) if self.method.uses_density else (),
            t=0.5 if slerp_t is None else slerp_t,
            normalize=self.method.default_normalize if normalize is None else normalize,
            lam=1.0 if lam is None else lam,
            rescale=True if rescale is None else rescale,
        )
        if self.method is Method.task_arithmetic and any(d != 1.0 for d in densities):
            raise UserError("task_arithmetic does not trim; use ties or dare_* for density")
        params.validate(self.method, where)
        return params
