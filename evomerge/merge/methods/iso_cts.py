"""Iso-CTS (Marczak et al., ICML 2025): Iso-C's common subspace (a `common_space_fraction` of the rank)
plus each task's own top directions outside it, one flat spectrum, scaled by `scaling_factor`. The
fraction is fixed in a search (it changes the subspaces, hence the SVDs); the scale is the gene. Not in
mergekit; FusionBench 0.2.33 is the oracle."""

from evomerge.merge.methods import _subspace
from evomerge.merge.methods.base import MergeMethod, Param


def _kernel(name, tvs, p):
    from evomerge.merge.kernels import subspace

    return subspace.iso_cts(tvs, p["common_space_fraction"])


METHOD = MergeMethod(
    name="iso_cts",
    summary="common and task-specific subspaces with an isotropic spectrum (Iso-CTS)",
    params=(
        Param("scaling_factor", default=1.0, low=0.0, gene=(0.0, 2.0)),
        Param("common_space_fraction", default=0.8, low=0.0, high=1.0),
        _subspace.EXCLUDE,
    ),
    exact=_subspace.exact(_kernel, "scaling_factor"),
    fast=_subspace.fast(_kernel, "scaling_factor", ("common_space_fraction",)),
    precompute=_subspace.precompute,
    in_mergekit=False,
    state_bytes=_subspace.state_bytes,
    min_inputs=2,
    baseline=lambda n: {"scaling_factor": 1.0},
)
