"""SCE (Wan et al., 2024, FuseChat): Select the entries where the task vectors vary most (top `select_topk`
of the nonzero variances), Calculate each task vector's weight from its mean square, Erase entries whose
sign disagrees with the elected one (TIES' sum rule), and merge. As mergekit 0.1.5 computes it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

F32 = torch.float32


def sce(base: torch.Tensor, models: Sequence[torch.Tensor], *, select_topk: float = 1.0) -> torch.Tensor:
    b = base.to(F32)
    if not models:
        return b.clone()
    tvs = torch.stack([m.to(F32) - b for m in models])
    if select_topk < 1:
        tvs = tvs * _select(tvs, select_topk).unsqueeze(0)
    elected = (tvs.sum(dim=0) >= 0).to(F32) * 2 - 1
    agree = (tvs.sign() == elected).to(F32)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = weights.sum().item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    weights = weights.view(-1, *([1] * (tvs.dim() - 1))) * agree
    return b + (tvs * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def _select(tvs: torch.Tensor, density: float) -> torch.Tensor:
    if density <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask
