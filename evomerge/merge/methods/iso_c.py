"""Iso-C (Marczak et al., "No Task Left Behind", ICML 2025): the sum of the task vectors with a flat
singular spectrum (every singular value set to their mean), scaled by `scaling_factor`. Not in mergekit;
FusionBench 0.2.33 is the oracle."""

from evomerge.merge.methods import _subspace
from evomerge.merge.methods.base import MergeMethod, Param


def _kernel(name, tvs, p):
    from evomerge.merge.kernels import subspace

    return subspace.iso_c(tvs)


METHOD = MergeMethod(
    name="iso_c",
    summary="sum of the task vectors with an isotropic spectrum (Iso-C)",
    params=(Param("scaling_factor", default=1.0, low=0.0, gene=(0.0, 2.0)), _subspace.EXCLUDE),
    exact=_subspace.exact(_kernel, "scaling_factor"),
    fast=_subspace.fast(_kernel, "scaling_factor", ()),
    precompute=_subspace.precompute,
    in_mergekit=False,
    state_bytes=_subspace.state_bytes,
    min_inputs=2,
    baseline=lambda n: {"scaling_factor": 1.0},
)
