"""SLERP: spherical interpolation between the base (t = 0) and one other model (t = 1), per tensor.
The angle between the two does not depend on the candidate: computed once."""

import torch

from evomerge.merge import kernels
from evomerge.merge.kernels.slerp import lerp_into, slerp_coefficients, slerp_dot
from evomerge.merge.methods.base import MergeMethod, Param


def _fast(kernels_, out, base, models, p, name, dot) -> None:
    coefs = torch.tensor(slerp_coefficients(dot, p["t"]), dtype=torch.float32, device=out.device)
    kernels_(lerp_into)(out, base, models[0], coefs)


METHOD = MergeMethod(
    name="slerp",
    summary="spherical interpolation of the base and one model",
    params=(Param("t", low=0.0, high=1.0, gene=(0.0, 1.0)),),
    exact=lambda name, base, models, p: kernels.slerp(p["t"], base, models[0]),
    inputs=1,
    fast=_fast,
    precompute=lambda name, base, models, eager: slerp_dot(base, models[0]),
    baseline=lambda n: {"t": 0.5},
    finals=4,
)
