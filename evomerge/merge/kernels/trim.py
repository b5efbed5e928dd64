"""Magnitude trimming for TIES: the exact top-k mask, and a precomputed threshold table for the search.

Exact top-k costs a sort per candidate (about 1% of copy bandwidth on a CPU). The magnitudes of a task
vector do not depend on the candidate, so `ThresholdTable` sorts them once and answers any density with a
threshold; a candidate's trim is then a single compare fused into the merge pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def keep_count(density: float, numel: int) -> int:
    """How many entries a top-k trim keeps (mergekit's rule: at least one of a nonempty tensor)."""
    return max(1, int(density * numel))


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Exact top-k by magnitude as a bool mask; ties resolved by a descending argsort (as mergekit does)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    flat = delta.abs().reshape(-1).float()
    keep = torch.argsort(flat, descending=True)[: keep_count(density, flat.numel())]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=delta.device)
    mask[keep] = True
    return mask.reshape(delta.shape)


class ThresholdTable:
    """Magnitudes of one tensor at geometrically spaced ranks; threshold(density) interpolates between them.

    With rank ratio `1 + step` between neighbours, the number kept by `|x| >= threshold` is within
    `step` (relative) of the exact top-k count. Small tensors keep every magnitude and are exact.
    """

    def __init__(self, magnitudes: torch.Tensor, step: float = 5e-4, min_density: float = 1e-4) -> None:
        values = np.sort(magnitudes.detach().reshape(-1).float().cpu().numpy())[::-1]
        self.numel = int(values.size)
        first = max(1, int(min_density * self.numel))
        count = int(math.log(self.numel / first) / math.log1p(step)) + 2 if self.numel > first else 1
        geometric = np.unique(np.rint(first * np.power(1.0 + step, np.arange(count))).astype(np.int64))
        ranks = np.unique(np.concatenate([np.arange(1, min(first, self.numel) + 1), geometric, [self.numel]]))
        ranks = ranks[(ranks >= 1) & (ranks <= self.numel)]
        if self.numel <= ranks.size * 2:
            ranks = np.arange(1, self.numel + 1)
        self.ranks = ranks  # 1-based ranks, ascending
        self.values = np.ascontiguousarray(values[ranks - 1]).astype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.ranks.nbytes + self.values.nbytes)

    def threshold(self, density: float) -> float:
        """Magnitude of the k-th largest entry (interpolated between stored ranks); -inf keeps everything."""
        if density >= 1:
            return float("-inf")
        k = keep_count(density, self.numel)
        pos = int(np.searchsorted(self.ranks, k))
        if pos < self.ranks.size and self.ranks[pos] == k:
            return float(self.values[pos])
        lo_rank, hi_rank = self.ranks[pos - 1], self.ranks[pos]
        lo_val, hi_val = float(self.values[pos - 1]), float(self.values[pos])
        frac = (k - lo_rank) / (hi_rank - lo_rank)
        return lo_val + (hi_val - lo_val) * frac
