"""Model Stock (Jang et al., 2024): move from the base towards the fine-tunes' average by a ratio computed
from the mean angle between their task vectors, t = k cos / (1 + (k - 1) cos), per tensor or (filter_wise)
per row. As mergekit 0.1.5 computes it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

F32 = torch.float32


def model_stock(
    base: torch.Tensor, models: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    shape = base.shape
    w0 = base.to(F32)
    ws = [m.to(F32) for m in models]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = a.norm(dim=-1) * b.norm(dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(
        singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(cos), denominator)
    )
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)
