"""SLERP: spherical interpolation between the base (t = 0) and one other model (t = 1), per tensor.
The angle between the two does not depend on the candidate: computed once."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param


def _fast(kernels_, out, base, models, p, name, dot) -> None:
    import torch

    coefs = kernels.slerp_coefficients(dot, p["t"])
    kernels_(kernels.lerp_into)(
        out, base, models[0], torch.tensor(coefs, dtype=torch.float32, device=out.device)
    )


METHOD = MergeMethod(
    name="slerp",
    summary="spherical interpolation of the base and one model",
    params=(Param("t", low=0.0, high=1.0, gene=(0.0, 1.0)),),
    exact=lambda name, base, models, p: kernels.slerp.slerp(p["t"], base, models[0]),
    inputs=1,
    fast=_fast,
    precompute=lambda name, base, models, eager: kernels.slerp_dot(base, models[0]),
    baseline=lambda n: {"t": 0.5},
    finals=4,
)
