"""Trims of a task vector that keep entries by rank, for the breadcrumbs and DELLA methods, and mergekit's
L1 rescale. Each returns a float32 0/1 mask (or a factor); the merge itself is the shared task-vector pass.

- outliers (Model Breadcrumbs, Davari & Belilovsky 2023): drop the `gamma` fraction of largest magnitudes
  and the smallest ones, keeping `density` of the entries (mergekit's rule: fewer outliers dropped when
  both cannot be met; ranks from an ascending sort of the float32 magnitudes).
- magprune (DELLA, Deep et al. 2024): keep each entry with a probability that grows with its magnitude's
  rank within its row, from density - epsilon (smallest) to density + epsilon (largest). The draw is a
  counter hash keyed by the caller (rng.py), so a mask is a function of (key, entry), on any device.
"""

from __future__ import annotations

import torch

from evomerge.merge.kernels.rng import uniform_from_index, uniform_table

F32 = torch.float32


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    numel = delta.numel()
    if density >= 1:
        return torch.ones(delta.shape, dtype=F32, device=delta.device)
    keep = int(density * numel)
    top = int(gamma * numel)
    bottom = max(0, numel - keep - top)
    order = torch.sort(delta.abs().reshape(-1).to(F32), descending=False).indices
    mask = torch.zeros(numel, dtype=F32, device=delta.device)
    mask[order[bottom : bottom + keep]] = 1.0
    return mask.reshape(delta.shape)


def row_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (0-based, mergekit's dim 1), in the narrowest integer
    type that holds the row length: it does not depend on the candidate, so the search keeps it."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs().to(F32), dim=1), dim=1)
    return ranks.to(torch.int16 if rows.shape[1] <= torch.iinfo(torch.int16).max else torch.int32)


def magprune_mask(delta: torch.Tensor, density: float, epsilon: float, key: int) -> torch.Tensor:
    if density >= 1:
        return torch.ones(delta.shape, dtype=F32, device=delta.device)
    return magprune_from_ranks(row_ranks(delta), density, epsilon, key).reshape(delta.shape)


def magprune_trim(
    model: torch.Tensor,
    base: torch.Tensor,
    ranks: torch.Tensor,
    low: torch.Tensor,
    epsilon: torch.Tensor,
    key: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DELLA's trim of one task vector in one function (what the engine compiles into one pass): its
    keep mask from `row_ranks` (probability `low` = density - epsilon plus 2 epsilon times the rank's
    place in its row; `low`, `epsilon` float32 and `key` int32 0-dim tensors, the vector under 2^30
    entries), and the L1 norms of the whole and of the kept entries. Eagerly, the same bits as
    magprune_mask and l1_rescale's sums."""
    delta = model.to(F32) - base.to(F32)
    # a row's ranks are a permutation of 0..L-1, so magprune's (r + 1 - min) / (max - min) is r / (L - 1),
    # the same float32 values, without the two reductions
    rank_norm = (ranks.to(F32) / (ranks.shape[1] - 1)).clamp(0, 1)
    probs = low + rank_norm * 2 * epsilon
    index = torch.arange(ranks.numel(), dtype=torch.int32, device=ranks.device).view(ranks.shape)
    keep = (uniform_from_index(index, key) < probs).to(F32).view(delta.shape)
    return keep, delta.abs().sum(), (delta * keep).abs().sum()


def magprune_from_ranks(ranks: torch.Tensor, density: float, epsilon: float, key: int) -> torch.Tensor:
    """DELLA's mask from `row_ranks` (shaped as rows): the same bits as ranking afresh."""
    ranks = ranks.to(F32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    uniform = uniform_table(key, ranks.numel(), ranks.device).view(ranks.shape)
    return (uniform < probs).to(F32)


def l1_rescale(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> float:
    """The factor that gives the kept entries the L1 norm of the whole vector (1 when either is ~0)."""
    return l1_factor(delta.abs().sum(), (delta * mask).abs().sum(), eps)


def l1_factor(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-7) -> float:
    if before < eps or after < eps:
        return 1.0
    return float(before / after)
