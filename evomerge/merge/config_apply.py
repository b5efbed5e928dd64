"""A mergekit merge config applied in place by the search's engine (a migrated mergekit-evolve run).

mergekit-evolve's candidates are merge configs: `models:` with gradients (smooth) or `slices:` whose
sources all take the same layer range (one slice per layer group). Both keep the models' layout, so each
output tensor is the method over the same-named tensors of some resident models: this module resolves,
with mergekit's rules (mergekit_config.ConfigPlan, slices.SlicePlan), every tensor's parameters and, where
slices change which models feed the method (slerp's two top-weighted models per group), which ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evomerge.errors import UserError
from evomerge.merge.methods import TensorParams
from evomerge.models.architecture import Family

Pick = tuple[int | None, tuple[int, ...]]


def config_params(
    config: dict[str, Any],
    names: Sequence[str],
    family: Family,
    num_layers: int,
    sources: Sequence[str],
    base: str | None,
    *,
    pool: bool,
) -> tuple[dict[str, TensorParams], dict[str, Pick] | None]:
    """Per tensor its parameters, and with `pool` (the engine holds `sources` as a pool) its base and
    inputs as pool indices. Without `pool` the engine's base is `base` and its inputs `sources`, in order:
    a config that feeds the method anything else is refused."""
    from evomerge.merge.mergekit_config import ConfigPlan, MergeConfig
    from evomerge.merge.slices import SlicePlan

    parsed = MergeConfig.model_validate({k: v for k, v in config.items() if v is not None})
    index = {ref: i for i, ref in enumerate(sources)}
    if parsed.slices is None:
        plan = ConfigPlan(parsed)
        if plan.base != base or plan.inputs != list(sources):
            raise UserError("merge config: its models are not the experiment's base and sources in order")
        params = {name: plan.tensor_params(name, family, num_layers) for name in names}
        picks = {name: (None, tuple(range(len(sources)))) for name in names} if pool else None
        return params, picks
    jobs = SlicePlan(parsed).jobs({ref: list(names) for ref in {*sources, *([base] if base else [])}}, family)
    params, picks = {}, {}
    for job in jobs:
        refs = [ref for ref, _ in job.inputs]
        if any(name != job.out for _, name in job.inputs) or (job.base and job.base[1] != job.out):
            raise UserError(f"merge config: {job.out} is built from other layers (a frankenmerge); the search "
                            "merges in place and keeps the models' layout")  # fmt: skip
        if pool:
            if job.base is not None and job.base[0] not in index:
                raise UserError(f"merge config: {job.base[0]} is not one of the sources")
            picks[job.out] = (index[job.base[0]] if job.base else None, tuple(index[r] for r in refs))
        elif refs != list(sources) or (job.base[0] if job.base else None) != base:
            raise UserError(f"merge config: {job.out} merges {refs}, not the experiment's sources in order")
        params[job.out] = job.params
    missing = [name for name in names if name not in params]
    if missing:
        raise UserError(f"merge config: no slice covers {missing[0]}")
    return params, (picks if pool else None)
