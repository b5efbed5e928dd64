"""mergekit-evolve's genome, for its users' configs (issue 28): what one of its genotypes means as a merge.

mergekit-evolve (deprecated in mergekit's Transformers-5 release) searches a genotype of shape
(layer groups, models, filter sets, parameters): `layer_granularity` layers per group (0: one group),
one parameter set per `filters` entry plus one for every other tensor, and the method's parameters
(weight; density for ties and dare_ties; t for slerp). A genotype becomes a mergekit merge config: weights
(and t) taken as absolute values unless `allow_negative_weights`, densities as |x| clipped to [0, 1];
per layer group one slice per model, or with `smooth` one gradient per model over the layer groups;
for slerp, per group the two models with the highest weight and t = softmax of their weights. This module
re-implements that mapping (tested equal to mergekit 0.1.5's `ModelGenome.genotype_merge_config`, config
and merged tensors); the search drives it like any other space.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHOD_PARAMS = {  # mergekit-evolve's methods and the genes of each, in its order
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}


class EvolveGenome(BaseModel):
    """mergekit-evolve's `genome:` section (its ModelGenomeDefinition), with its rules as one-line errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    models: list[str] = Field(min_length=1)
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = 0
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False

    @model_validator(mode="after")
    def _rules(self) -> EvolveGenome:
        if self.merge_method not in METHOD_PARAMS:
            raise ValueError(
                f"merge_method: mergekit-evolve has no {self.merge_method!r} ({', '.join(METHOD_PARAMS)})"
            )
        if self.merge_method in ("ties", "dare_ties", "task_arithmetic") and self.base_model is None:
            raise ValueError(f"base_model is required for {self.merge_method}")
        if self.merge_method == "slerp" and self.smooth:
            raise ValueError("smooth is not supported for slerp (mergekit-evolve refuses it too)")
        if self.merge_method == "slerp" and self.filters:
            raise ValueError("filters are not supported for slerp (mergekit-evolve refuses them too)")
        return self

    def groups(self, num_layers: int) -> int:
        if self.layer_granularity > 0 and num_layers % self.layer_granularity:
            raise ValueError(
                f"layer_granularity {self.layer_granularity} does not divide the models' {num_layers} layers"
            )
        return num_layers // self.layer_granularity if self.layer_granularity > 0 else 1

    def shape(self, num_layers: int) -> tuple[int, int, int, int]:
        """(layer groups, models, parameter sets, parameters) of a genotype."""
        sets = len(self.filters or []) + 1
        return self.groups(num_layers), len(self.models), sets, len(METHOD_PARAMS[self.merge_method])

    def initial_genotype(self, num_layers: int):
        """mergekit-evolve's starting point: every weight 1/models, every density (or other gene) 1."""
        import torch

        x0 = torch.zeros(self.shape(num_layers))
        x0[:, :, :, 0] = 1 / len(self.models)
        x0[:, :, :, 1:] = 1
        return x0

    def merge_config(self, genotype, num_layers: int) -> dict[str, Any]:
        """The mergekit merge config a genotype (flat, or of `shape`) stands for, as plain data."""
        import torch

        g = torch.as_tensor(genotype)
        g = g.reshape(self.shape(num_layers)) if g.dim() == 1 else g
        if tuple(g.shape) != self.shape(num_layers):
            raise ValueError(f"genotype of shape {tuple(g.shape)}, expected {self.shape(num_layers)}")
        step = self.layer_granularity if self.layer_granularity > 0 else num_layers
        models, slices = None, None
        if self.merge_method == "slerp":
            slices = [self._slerp_slice(g, k, step) for k in range(g.shape[0])]
        else:
            values = {}
            for j, name in enumerate(METHOD_PARAMS[self.merge_method]):
                v = g[:, :, :, j]
                if name == "density":
                    v = v.abs().clamp(0, 1)
                elif not self.allow_negative_weights:
                    v = v.abs()
                values[name] = v
            if self.smooth:
                models = [self._smooth_model(values, i, num_layers) for i in range(len(self.models))]
                if self.base_model and self.base_model not in self.models:
                    models.append({"model": self.base_model})
            else:
                slices = [self._slice(values, k, step) for k in range(g.shape[0])]
        normalize = self.normalize
        if normalize is None:
            normalize = self.merge_method in ("ties", "dare_ties", "linear")
        return {
            "merge_method": self.merge_method, "slices": slices, "models": models,
            "parameters": {"normalize": normalize, "int8_mask": True}, "dtype": "bfloat16",
            "base_model": self.base_model, "tokenizer_source": self.tokenizer_source,
        }  # fmt: skip

    def _setting(self, per_set: list[Any]) -> Any:
        """One parameter's value over the filter sets: plain, or one {filter, value} per set (None: the rest)."""
        if len(per_set) == 1:
            return per_set[0]
        names = [*(self.filters or []), None]
        return [{"filter": f, "value": v} for f, v in zip(names, per_set, strict=True)]

    def _slice(self, values, k: int, step: int) -> dict[str, Any]:
        layers = [k * step, (k + 1) * step]
        sources = []
        for i, model in enumerate(self.models):
            params = {
                name: self._setting([v[k, i, s].item() for s in range(v.shape[2])])
                for name, v in values.items()
            }
            sources.append({"model": model, "layer_range": layers, "parameters": params})
        if self.base_model and self.base_model not in self.models:
            sources.append({"model": self.base_model, "layer_range": layers})
        return {"sources": sources}

    def _smooth_model(self, values, i: int, num_layers: int) -> dict[str, Any]:
        def gradient(v):  # one value per layer group: mergekit's gradient list (a single value stays plain)
            out = v.tolist()
            return out[0] if len(out) == 1 else out

        params = {
            name: self._setting([gradient(v[:, i, s]) for s in range(v.shape[2])])
            for name, v in values.items()
        }
        return {"model": self.models[i], "layer_range": [0, num_layers], "parameters": params}

    def _slerp_slice(self, g, k: int, step: int) -> dict[str, Any]:
        import torch

        layers = [k * step, (k + 1) * step]
        top = torch.topk(g[k, :, 0, 0], 2)
        first, second = (int(x) for x in top.indices)
        t = torch.softmax(top.values, dim=-1)[1].item()
        sources = [{"model": self.models[i], "layer_range": layers} for i in (first, second)]
        if self.tokenizer_source:
            sources[0]["parameters"] = {"weight": 1 - t}
            sources[1]["parameters"] = {"weight": t}
        if self.base_model and self.base_model not in self.models:
            sources.append({"model": self.base_model, "layer_range": layers})
        return {"sources": sources, "parameters": {"t": t}, "base_model": self.models[first]}
