"""TIES (Yadav et al., 2023): trim each task vector to its top-k magnitudes, elect a sign per entry,
average the entries that agree. The search's path trims by a precomputed threshold table."""

from evomerge.merge import kernels
from evomerge.merge.methods._gta import (
    default_baseline,
    fast_threshold,
    gta_params,
    precompute_thresholds,
    threshold_bytes,
)
from evomerge.merge.methods.base import MergeMethod

METHOD = MergeMethod(
    name="ties",
    summary="top-k trim, sign election, mean of the agreeing entries",
    params=gta_params(normalize=True),
    exact=lambda name, base, models, p: kernels.ties.ties(
        base, models, p["weight"], p["density"], normalize=p["normalize"], lam=p["lambda"]
    ),
    fast=fast_threshold,
    precompute=precompute_thresholds,
    state_bytes=threshold_bytes,
    baseline=default_baseline,
    finals=2,
)
