"""Task arithmetic (Ilharco et al., 2022): base + lambda * sum_j w_j (model_j - base)."""

from evomerge.merge import kernels
from evomerge.merge.methods._gta import fast_all, full_density, gta_params
from evomerge.merge.methods.base import MergeMethod

METHOD = MergeMethod(
    name="task_arithmetic",
    summary="adds the weighted task vectors to the base",
    params=gta_params(normalize=False, trims=False),
    exact=lambda name, base, models, p: kernels.task_arithmetic.task_arithmetic(
        base, models, p["weight"], normalize=p["normalize"], lam=p["lambda"]
    ),
    fast=fast_all(consensus=False),
    baseline=lambda n: {"weight": 1.0},
    finals=1,
    check=full_density,
)
