"""Model Breadcrumbs (Davari & Belilovsky, 2023): each task vector loses its largest
(`gamma`) and smallest entries, keeping `density` of them; the kept entries are summed.
Fast path: none yet, the search runs the exact kernel (one sort per task vector and candidate)."""

from evomerge.merge.kernels.sparsify import outlier_mask
from evomerge.merge.methods._gta import GAMMA, default_baseline, gta_params, sparsified_exact
from evomerge.merge.methods.base import MergeMethod

METHOD = MergeMethod(
    name="breadcrumbs",
    summary="drop the largest and smallest task-vector entries",
    params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
    exact=sparsified_exact(
        lambda j, delta, p, name: outlier_mask(delta, p["density"][j], p["gamma"][j]), False
    ),
    baseline=default_baseline,
)
