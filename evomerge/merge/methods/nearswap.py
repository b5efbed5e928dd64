"""NearSwap: take the other model's value where it is within `t` of the base's, interpolate towards the
base as they move apart (weight t / |base - other|, clipped to [0, 1]). One elementwise pass."""

import torch

from evomerge.merge.methods.base import MergeMethod, Param

F32 = torch.float32


def nearswap_into(out: torch.Tensor, base: torch.Tensor, other: torch.Tensor, t: torch.Tensor) -> None:
    a, b = base.to(F32), other.to(F32)
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    out.copy_(weight * b + (1 - weight) * a)


def _exact(name, base, models, p) -> torch.Tensor:
    out = torch.empty(base.shape, dtype=F32, device=base.device)
    nearswap_into(out, base, models[0], torch.tensor(p["t"], dtype=F32, device=base.device))
    return out


def _fast(kernels, out, base, models, p, name, state) -> None:
    kernels(nearswap_into)(out, base, models[0], torch.tensor(p["t"], dtype=F32, device=out.device))


METHOD = MergeMethod(
    name="nearswap",
    summary="the other model where it is near the base, the base where they differ",
    params=(Param("t", low=0.0, gene=(0.0, 0.001)),),
    exact=_exact,
    inputs=1,
    fast=_fast,
    baseline=lambda n: {"t": 0.0001},
)
