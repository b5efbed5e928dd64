"""NuSLERP: SLERP of two models (of their task vectors when a base is given) with t = w1 / (w0 + w1),
row-wise, column-wise or over the flattened tensor. Per-row norms: the search runs the exact kernel."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param


def _exact(name, base, models, p):
    w0, w1 = p["weight"]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    dim = 0 if p["nuslerp_row_wise"] else -1
    flatten = p["nuslerp_flatten"]
    if base is None:
        return kernels.spherical.nuslerp(t, models[0], models[1], dim=dim, flatten=flatten)
    b = base.float()
    return b + kernels.spherical.nuslerp(
        t, models[0].float() - b, models[1].float() - b, dim=dim, flatten=flatten
    )


METHOD = MergeMethod(
    name="nuslerp",
    summary="SLERP of two models or task vectors, by rows, columns or flattened",
    params=(
        Param("weight", per_input=True, gene=(0.0, 1.0)),
        Param("nuslerp_row_wise", kind=bool, default=False),
        Param("nuslerp_flatten", kind=bool, default=True),
    ),
    exact=_exact,
    needs_base=False,
    optional_base=True,
    inputs=2,
    baseline=lambda n: {"weight": 1.0},
)
