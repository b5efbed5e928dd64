"""NearSwap: take the other model's value where it is within `t` of the base's, interpolate towards the
base as they move apart (weight t / |base - other|, clipped to [0, 1]). One elementwise pass."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param


def _fast(kernels_, out, base, models, p, name, state) -> None:
    import torch

    t = torch.tensor(p["t"], dtype=torch.float32, device=out.device)
    kernels_(kernels.nearswap.nearswap_into)(out, base, models[0], t)


METHOD = MergeMethod(
    name="nearswap",
    summary="the other model where it is near the base, the base where they differ",
    params=(Param("t", low=0.0, gene=(0.0, 0.001)),),
    exact=lambda name, base, models, p: kernels.nearswap.nearswap(p["t"], base, models[0]),
    inputs=1,
    fast=_fast,
    baseline=lambda n: {"t": 0.0001},
)
