"""Linear (weighted average) merge: sum_j w_j model_j, divided by sum_j w_j when normalising."""

from __future__ import annotations

from collections.abc import Sequence

import torch

F32 = torch.float32


def linear_into(
    out: torch.Tensor, models: Sequence[torch.Tensor], weights: torch.Tensor, normalize: bool
) -> None:
    acc = models[0].to(F32) * weights[0]
    for j in range(1, len(models)):
        acc = acc + models[j].to(F32) * weights[j]
    if normalize:
        acc = acc / weights.sum()
    out.copy_(acc)


def linear(
    models: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    first = models[0]
    out = torch.empty(first.shape, dtype=F32, device=first.device)
    linear_into(out, models, torch.as_tensor(weights, dtype=F32, device=first.device), normalize)
    return out
