"""DELLA (Deep et al., 2024), with TIES' sign election: MagPrune keeps each task-vector entry with a probability
from density - epsilon (smallest magnitude in its row) to density + epsilon (largest); survivors are
rescaled to the vector's L1 norm (mergekit's rescale). The draw is a counter hash keyed by the candidate's
seed, like DARE's. Fast path: none yet, the search runs the exact kernel (ranks per candidate)."""

from evomerge.merge.kernels.rng import derive_key
from evomerge.merge.kernels.sparsify import magprune_mask
from evomerge.merge.methods._gta import (
    EPSILON,
    check_epsilon,
    default_baseline,
    gta_params,
    repair_epsilon,
    sparsified_exact,
)
from evomerge.merge.methods.base import MergeMethod


def _mask(j, delta, p, name):
    return magprune_mask(delta, p["density"][j], p["epsilon"][j], derive_key(p.seed, name, j))


METHOD = MergeMethod(
    name="della",
    summary="magnitude-ranked random drop, L1 rescale, sign election",
    params=gta_params(normalize=True, rescale=True, extra=(EPSILON,)),
    exact=sparsified_exact(_mask, True),
    baseline=default_baseline,
    random=True,
    check=check_epsilon,
    repair=repair_epsilon,
)
