"""Task arithmetic: base + lambda * sum_j w_j (model_j - base) (Ilharco et al., 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.kernels.gta import F32, gta_apply


def task_arithmetic(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lam: float = 1.0,
) -> torch.Tensor:
    out = torch.empty(base.shape, dtype=F32, device=base.device)
    return gta_apply(out, base, models, weights, mode="all", consensus=False, normalize=normalize, lam=lam)
