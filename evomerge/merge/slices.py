"""mergekit's `slices:` (frankenmerging): an output model built from layer ranges of its inputs, each
output slice merged with the config's method (`passthrough` stacks one source's layers as they are).

mergekit 0.1.5's rules, followed exactly: the layers of all sources of a slice are merged position by
position (their ranges have one length); a gradient's t runs over the slice's own layers (idx / (n - 1),
1 for a one-layer slice); the embeddings come from the first slice's sources and the final norm and head
from the last slice's, both at t = 0; a parameter is looked up on the slice source, then the slice, then
the global `parameters`; a slice may name its own `base_model`, which must be one of its sources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from evomerge.errors import UserError
from evomerge.merge.mergekit_config import MergeConfig, SliceDef, check_parameter_names, resolve
from evomerge.merge.methods import Method, TensorParams, parse_method
from evomerge.models.architecture import EMBED, Family


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: which tensor of which model is its base and its inputs, and its parameters."""

    out: str
    base: tuple[str, str] | None  # (model reference, tensor name)
    inputs: tuple[tuple[str, str], ...]
    params: TensorParams


class SlicePlan:
    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.method: Method = parse_method(config.merge_method)
        self.spec = self.method.spec
        slices = config.slices or []
        if not slices:
            raise UserError("slices: at least one slice is needed")
        scopes = [config.parameters or {}]
        for k, piece in enumerate(slices):
            if not piece.sources:
                raise UserError(f"slices[{k}]: no sources")
            lengths = {s.layer_range[1] - s.layer_range[0] for s in piece.sources}
            if len(lengths) != 1:
                raise UserError(f"slices[{k}]: all sources of a slice must span the same number of layers")
            for s in piece.sources:
                if not 0 <= s.layer_range[0] < s.layer_range[1]:
                    raise UserError(f"slices[{k}]: layer_range {list(s.layer_range)} is empty or negative")
            refs = [s.model for s in piece.sources]
            if len(set(refs)) != len(refs):
                raise UserError(f"slices[{k}]: a model is listed twice")
            scopes.append(piece.parameters or {})
            base = self._base(piece)
            if base is not None and base not in refs and (self.spec.needs_base or self.spec.optional_base):
                raise UserError(f"slices[{k}]: the base_model {base} must be one of the slice's sources")
            try:
                self.spec.check_models(base is not None, len(self._inputs(piece)), base="a base_model")
            except UserError as exc:
                raise UserError(f"slices[{k}]: {exc}") from None
        tolerated = ("weight",) if self.method.value == "slerp" and config.tokenizer_source else ()
        check_parameter_names(
            self.spec, self.method.value, scopes, [s.parameters or {} for p in slices for s in p.sources],
            tolerated,
        )  # fmt: skip

    def _base(self, piece: SliceDef) -> str | None:
        if not (self.spec.needs_base or self.spec.optional_base):
            return None
        return piece.base_model or self.config.base_model

    def _inputs(self, piece: SliceDef) -> list[str]:
        base = self._base(piece)
        return [s.model for s in piece.sources if s.model != base]

    @property
    def all_refs(self) -> list[str]:
        seen: dict[str, None] = {}
        for piece in self.config.slices or []:
            for s in piece.sources:
                seen.setdefault(s.model, None)
        return list(seen)

    def layer_sources(self) -> list[tuple[str, int]]:
        """For each output layer, the (model, layer) of its slice's first source (config lists follow it)."""
        out = []
        for piece in self.config.slices or []:
            first = piece.sources[0]
            out += [(first.model, layer) for layer in range(*first.layer_range)]
        return out

    def jobs(self, tensors: dict[str, list[str]], family: Family) -> list[TensorJob]:
        """Every output tensor in model order. `tensors`: each model's tensor names (the written ones)."""
        slices = self.config.slices or []
        names = tensors[slices[0].sources[0].model]
        outer = [n for n in names if family.layer_index(n) is None]
        jobs = [self._job(slices[0], n, n, {}, 0.0) for n in outer if family.group(n) == EMBED]
        out_layer = 0
        for piece in slices:
            length = piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0]
            for offset in range(length):
                t = offset / (length - 1) if length > 1 else 1.0
                first = piece.sources[0]
                src_layer = first.layer_range[0] + offset
                suffixes = [
                    _suffix(n, family) for n in tensors[first.model] if family.layer_index(n) == src_layer
                ]
                for suffix in suffixes:
                    sources = {
                        s.model: _layer_name(family, s.layer_range[0] + offset, suffix) for s in piece.sources
                    }
                    for model, name in sources.items():
                        if name not in tensors[model]:
                            raise UserError(f"slices: {model} has no tensor {name}")
                    jobs.append(self._job(piece, _layer_name(family, out_layer, suffix), None, sources, t))
                out_layer += 1
        jobs += [self._job(slices[-1], n, n, {}, 0.0) for n in outer if family.group(n) != EMBED]
        return jobs

    def _job(
        self, piece: SliceDef, out: str, same: str | None, sources: dict[str, str], t: float
    ) -> TensorJob:
        if same is not None:  # a tensor outside the layers: the same name in every source
            sources = {s.model: same for s in piece.sources}
        base = self._base(piece)
        inputs = self._inputs(piece)
        values: dict[str, Any] = {}
        per_model = {s.model: s.parameters or {} for s in piece.sources}
        shared_scopes = [piece.parameters or {}, self.config.parameters or {}]
        where = f"tensor {out}"
        for param in self.spec.params:
            if param.per_input:
                given = [resolve(param, [per_model[m], *shared_scopes], sources[m], t) for m in inputs]
                for model, value in zip(inputs, given, strict=True):
                    if value is None and param.default is None:
                        raise UserError(f"missing parameter {param.name} for model {model} ({where})")
                values[param.name] = tuple(param.default if v is None else v for v in given)
            else:
                value = resolve(param, shared_scopes, out, t)
                if value is None and param.default is None:
                    raise UserError(f"missing parameter {param.name} for {self.method.value} ({where})")
                values[param.name] = param.default if value is None else value
        params = self.spec.tensor_params(values, len(inputs), where)
        return TensorJob(
            out,
            (base, sources[base]) if base is not None else None,
            tuple((m, sources[m]) for m in inputs),
            params,
        )


def _suffix(name: str, family: Family) -> str:
    return re.sub(family.layer_pattern, "", name, count=1)


def _layer_name(family: Family, layer: int, suffix: str) -> str:
    prefix = family.layer_pattern.removeprefix("^").replace(r"\.", ".").replace(r"(\d+)", str(layer))
    return prefix + suffix


# config.json keys that hold one entry per decoder layer in transformers' configs (a list that merely has
# as many entries as there are layers, e.g. eos_token_id, is not one of them)
PER_LAYER_KEYS = frozenset({
    "layer_types", "no_rope_layers", "num_kv_heads", "num_query_heads", "ffn_multipliers",
    "intermediate_size", "num_key_value_heads", "num_attention_heads", "sliding_window_layers",
})  # fmt: skip


def sliced_config(config: dict[str, Any], num_layers: int, layer_sources: list[tuple[str, int]],
                  configs: dict[str, dict[str, Any]], key: str = "num_hidden_layers") -> dict[str, Any]:  # fmt: skip
    """The first model's config at the new depth: every per-layer list (layer_types, ...) rebuilt from the
    layer each output layer came from."""
    out = dict(config)
    old = config.get(key)
    out[key] = num_layers
    for name, value in config.items():
        if name in PER_LAYER_KEYS and isinstance(value, list) and old is not None and len(value) == old:
            rebuilt = []
            for model, layer in layer_sources:
                theirs = configs[model].get(name)
                if not isinstance(theirs, list) or layer >= len(theirs):
                    raise UserError(f"model {model}: config.json's {name} has no entry for layer {layer}")
                rebuilt.append(theirs[layer])
            out[name] = rebuilt
    return out
