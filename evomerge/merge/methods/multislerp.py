"""Multi-SLERP (Goddard, 2024): barycentric interpolation of several models on the sphere, of their task
vectors when a base is given. Reductions per tensor (norms, mean direction): the search runs the exact
kernel."""

from evomerge.merge.kernels.spherical import multislerp
from evomerge.merge.methods.base import MergeMethod, Param

METHOD = MergeMethod(
    name="multislerp",
    summary="weighted interpolation of several models on the sphere",
    params=(
        Param("weight", per_input=True, gene=(0.0, 1.0)),
        Param("normalize_weights", kind=bool, default=True),
        Param("eps", default=1e-8, low=0.0),
    ),
    exact=lambda name, base, models, p: multislerp(
        base, models, p["weight"], normalize_weights=p["normalize_weights"], eps=p["eps"]
    ),
    needs_base=False,
    optional_base=True,
    baseline=lambda n: {"weight": 1.0},
)
