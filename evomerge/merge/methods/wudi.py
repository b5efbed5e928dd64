"""WUDI (Cheng et al., "Whoever Started the Interference Should End It", ICML 2025): per matrix, Adam on
the merged task vector's interference with each task vector's own rows, from their sum (`iter_num`
steps at `lr`; FusionBench's defaults 400 and 1e-5). The optimisation does not depend on the search's
`scaling_factor` (1: FusionBench's WUDI), so a search runs it once per tensor. Not in mergekit;
FusionBench 0.2.33 is the oracle."""

from evomerge.errors import UserError
from evomerge.merge.methods import _subspace
from evomerge.merge.methods.base import MergeMethod, Param, TensorParams


def _kernel(name, tvs, p):
    from evomerge.merge.kernels import subspace

    return subspace.wudi(tvs, int(p["iter_num"]), p["lr"])


def _check(p: TensorParams, where: str) -> None:
    if p["iter_num"] != int(p["iter_num"]):
        raise UserError(f"{where}: iter_num must be a whole number, got {p['iter_num']}")


METHOD = MergeMethod(
    name="wudi",
    summary="task vectors' sum optimised against each task's interference (WUDI)",
    params=(
        Param("scaling_factor", default=1.0, low=0.0, gene=(0.0, 2.0)),
        Param("iter_num", default=400.0, low=0.0, open_low=True),
        Param("lr", default=1e-5, low=0.0, open_low=True),
        _subspace.EXCLUDE,
    ),
    exact=_subspace.exact(_kernel, "scaling_factor"),
    fast=_subspace.fast(_kernel, "scaling_factor", ("iter_num", "lr")),
    precompute=_subspace.precompute,
    in_mergekit=False,
    state_bytes=_subspace.state_bytes,
    min_inputs=2,
    check=_check,
    baseline=lambda n: {"scaling_factor": 1.0},
)
