"""RegMean (Jin et al., ICLR 2023): the merge of linear layers that best reproduces every model's outputs
on its own inputs, W = (sum_i w_i G_i)^-1 sum_i w_i G_i W_i (in the x W^T convention of nn.Linear),
where G_i is the Gram matrix of the layer's inputs under model i; off-diagonal Gram entries are shrunk by
`ratio` (1 keeps them, 0 leaves only the diagonal: a per-input-feature weighted average)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shrink_off_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """gram with its off-diagonal entries times `ratio`, the diagonal unchanged."""
    scale = torch.full_like(gram, ratio)
    scale.diagonal().fill_(1.0)
    return gram * scale


def regmean(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    ratio: float,
    mix: Sequence[float] | None = None,
) -> torch.Tensor:
    """The RegMean merge of one Linear weight (out x in) from each model's weight and input Gram (in x in);
    `mix` weighs the models (1 each: RegMean itself). Solved, not inverted."""
    mix = [1.0] * len(weights) if mix is None else list(mix)
    shrunk = [m * shrink_off_diagonal(g.float(), ratio) for m, g in zip(mix, grams, strict=True)]
    rhs = sum(g @ w.float().T for g, w in zip(shrunk, weights, strict=True))
    return torch.linalg.solve(sum(shrunk), rhs).T


def weighted_mean(tensors: Sequence[torch.Tensor], mix: Sequence[float] | None = None) -> torch.Tensor:
    """What RegMean gives every tensor that is not a Linear weight: the (weighted) mean."""
    mix = [1.0] * len(tensors) if mix is None else list(mix)
    total = sum(mix)
    if total <= 0:
        mix, total = [1.0] * len(tensors), float(len(tensors))
    return sum(m * t.float() for m, t in zip(mix, tensors, strict=True)) / total
