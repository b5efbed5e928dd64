"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023):
each Linear weight is the least-squares merge of the models' weights on their own inputs, from the Gram
matrices of those inputs (`merge.calibration`: items of a configured task's search split, computed once
per worker before the first candidate); every other tensor is the mean. `reduce_non_diagonal_ratio`
shrinks the Grams' off-diagonal entries (FusionBench's RegMean config: 0.1); `weight` weighs each model
(1 each: RegMean itself). Not in mergekit; FusionBench 0.2.33's merging_with_regmean_weights is the oracle.
Merges the models themselves: a base, if the experiment has one, is not used."""

from evomerge.errors import UserError
from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param


def _exact(name, base, models, p):
    raise UserError("regmean merges from the models' activation statistics: they were not computed")


def calibrated(name, base, models, p, grams):
    """The merge of one tensor from its Grams (None: not a Linear weight, the weighted mean)."""
    if grams is None:
        return kernels.regmean.weighted_mean(models, p["weight"])
    return kernels.regmean.regmean(models, grams, p["reduce_non_diagonal_ratio"], p["weight"])


def _fast(kernels_, out, base, models, p, name, grams) -> None:
    out.copy_(calibrated(name, base, models, p, grams))


METHOD = MergeMethod(
    name="regmean",
    summary="least-squares merge of each Linear layer on the models' own inputs (RegMean)",
    params=(
        Param("weight", per_input=True, default=1.0, low=0.0, gene=(0.0, 1.0)),
        Param("reduce_non_diagonal_ratio", default=0.1, low=0.0, high=1.0, gene=(0.0, 1.0)),
    ),
    exact=_exact,
    fast=_fast,
    needs_base=False,
    min_inputs=2,
    calibrated=True,
    exact_calibrated=calibrated,
    in_mergekit=False,
    state_bytes=lambda numel, row, count: 4 * row * row * count,  # one in x in Gram per model
    baseline=lambda n: {"weight": 1.0, "reduce_non_diagonal_ratio": 0.1},
)
