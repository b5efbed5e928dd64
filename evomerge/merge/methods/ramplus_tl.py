"""RAM+ (tensor-local): RAM, with each task vector's unique entries scaled by 1 + r * clamp(shared /
unique, 0, alpha) in this tensor. `r` and `alpha` are its genes (one each per block)."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param

METHOD = MergeMethod(
    name="ramplus_tl",
    summary="RAM with unique changes boosted by their overlap ratio",
    params=(
        Param("r", default=0.1, low=0.0, gene=(0.0, 0.5)),
        Param("alpha", default=0.2, low=0.0, gene=(0.0, 1.0)),
        Param("epsilon", default=1e-5, low=0.0),
    ),
    exact=lambda name, base, models, p: kernels.fusion.ram(
        base, models, epsilon=p["epsilon"], r=p["r"], alpha=p["alpha"]
    ),
    baseline=lambda n: {"r": 0.1, "alpha": 0.2},
)
