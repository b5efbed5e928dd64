"""TSV-M (Task Singular Vectors: Merging; Gargiulo et al., CVPR 2025): each task vector keeps its top
rank/T singular directions, the stacked bases are orthogonalised, scaled by `alpha` (FusionBench's scalar
alpha). Not in mergekit; FusionBench 0.2.33 is the oracle."""

from evomerge.errors import UserError
from evomerge.merge.methods import _subspace
from evomerge.merge.methods.base import MergeMethod, Param


def _kernel(name, tvs, p):
    from evomerge.merge.kernels import subspace

    check_rank(tuple(tvs[0].shape), len(tvs), f"tensor {name}")
    return subspace.tsv_m(tvs)


def check_rank(shape, count: int, where: str) -> None:
    """FusionBench returns zeros for a matrix whose rank is below the number of task vectors (it keeps
    rank // T = 0 directions of each): refused here instead."""
    from evomerge.merge.kernels.subspace import tsv_rank

    if len(shape) == 2 and tsv_rank(shape, count) == 0:
        raise UserError(
            f"{where}: tsv_m keeps min{tuple(shape)} // {count} = 0 singular directions per model; "
            "exclude this tensor (merge.exclude) or merge fewer models"
        )


METHOD = MergeMethod(
    name="tsv_m",
    summary="top rank/T singular directions of each task vector, orthogonalised (TSV-M)",
    params=(Param("alpha", default=1.0, low=0.0, gene=(0.0, 2.0)), _subspace.EXCLUDE),
    exact=_subspace.exact(_kernel, "alpha"),
    fast=_subspace.fast(_kernel, "alpha", ()),
    precompute=_subspace.precompute,
    in_mergekit=False,
    state_bytes=_subspace.state_bytes,
    min_inputs=2,
    baseline=lambda n: {"alpha": 1.0},
)
