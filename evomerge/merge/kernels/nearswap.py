"""NearSwap: the other model's value where it is within `t` of the base's, interpolated towards the base
as they move apart (weight t / |base - other|, clipped to [0, 1]). One elementwise pass."""

from __future__ import annotations

import torch

F32 = torch.float32


def nearswap_into(out: torch.Tensor, base: torch.Tensor, other: torch.Tensor, t: torch.Tensor) -> None:
    a, b = base.to(F32), other.to(F32)
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    out.copy_(weight * b + (1 - weight) * a)


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    out = torch.empty(base.shape, dtype=F32, device=base.device)
    nearswap_into(out, base, other, torch.tensor(t, dtype=F32, device=base.device))
    return out
