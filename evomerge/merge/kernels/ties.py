"""TIES (Yadav et al., 2023): trim each task vector to its top-k magnitudes, elect a sign per entry by
summed weighted magnitude, average the entries that agree with it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.kernels.gta import F32, gta_apply
from evomerge.merge.kernels.trim import topk_mask


def ties(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    lam: float = 1.0,
) -> torch.Tensor:
    """Exact TIES (true top-k per task vector)."""
    b = base.to(F32)
    masks = [topk_mask(m.to(F32) - b, d) for m, d in zip(models, densities, strict=True)]
    out = torch.empty(base.shape, dtype=F32, device=base.device)
    return gta_apply(
        out, base, models, weights, mode="mask", masks=masks, consensus=True, normalize=normalize, lam=lam
    )
