"""Karcher mean: the models' equal-weight Riemannian mean direction on the sphere, scaled by their mean
norm (iterated to `tol` or `max_iter` steps per tensor). No per-model parameter: a baseline."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param


def _exact(name, base, models, p):
    return kernels.spherical.karcher(
        models, [1.0 / len(models)] * len(models), max_iter=int(p["max_iter"]), tol=p["tol"]
    )


METHOD = MergeMethod(
    name="karcher",
    summary="Riemannian mean of the models on the sphere",
    params=(Param("max_iter", default=10, low=0.0), Param("tol", default=1e-5, low=0.0)),
    exact=_exact,
    needs_base=False,
    baseline=lambda n: {},
)
