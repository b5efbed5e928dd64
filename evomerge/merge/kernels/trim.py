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


def keep_above(magnitude: torch.Tensor, value, tie_fraction, uniform: torch.Tensor) -> torch.Tensor:
    """Entries above `value`, plus a hashed `tie_fraction` of those equal to it (see ThresholdTable)."""
    return (magnitude > value) | ((magnitude == value) & (uniform < tie_fraction))


def strict_thresholds(cuts: list[tuple[float, float]]) -> list[float] | None:
    """Thresholds v' with `|x| > v'` equal to keep_above(|x|, v, q, u) for every u, when no q needs the
    hash: q = 0 keeps |x| > v; q = 1 keeps |x| >= v, i.e. |x| > the float32 just below v. None otherwise
    (a real tie fraction, common in bf16 task vectors)."""
    if any(q not in (0.0, 1.0) for _, q in cuts):
        return None
    below = lambda v: float(np.nextafter(np.float32(v), np.float32(-np.inf)))  # noqa: E731
    return [below(v) if q == 1.0 else v for v, q in cuts]


class ThresholdTable:
    """Sorted magnitudes of one tensor, sampled at geometrically spaced ranks, for top-k by comparison.

    For each sampled value v the table stores how many entries are > v and >= v. `threshold(density)`
    returns (v, q) for `keep_above`: keep |x| > v, and a fraction q of the entries tied at v. Ties matter:
    task vectors of bf16 models have large blocks of equal magnitudes, and no plain threshold hits k.
    Between sampled values the threshold is interpolated; with rank ratio `1 + step` between samples the
    kept count is within `step` (relative) of k. Small tensors keep every magnitude and are exact.
    """

    def __init__(self, magnitudes: torch.Tensor, step: float = 5e-4, min_density: float = 1e-4) -> None:
        values = np.sort(magnitudes.detach().reshape(-1).float().cpu().numpy())  # ascending
        self.numel = n = int(values.size)
        first = max(1, int(min_density * n))
        count = int(math.log(n / first) / math.log1p(step)) + 2 if n > first else 1
        geometric = np.rint(first * np.power(1.0 + step, np.arange(count))).astype(np.int64)
        ranks = np.unique(np.concatenate([np.arange(1, min(first, n) + 1), geometric, [n]]))
        ranks = ranks[(ranks >= 1) & (ranks <= n)] if n > 2 * ranks.size else np.arange(1, n + 1)
        picked = values[n - ranks]  # the rank-th largest
        self.values = np.ascontiguousarray(picked, dtype=np.float32)
        # counts of entries > v and >= v; duplicates of v across samples collapse into one block
        self.count_gt = (n - np.searchsorted(values, picked, side="right")).astype(np.int64)
        self.count_ge = (n - np.searchsorted(values, picked, side="left")).astype(np.int64)

    @staticmethod
    def estimate_nbytes(numel: int, step: float = 5e-4, min_density: float = 1e-4) -> int:
        """About what a table of a tensor of `numel` entries holds, without building it (memory plan)."""
        first = max(1, int(min_density * numel))
        count = int(math.log(numel / first) / math.log1p(step)) + 2 if numel > first else 1
        return 20 * min(numel, first + count)  # a float32 value and two int64 counts per sampled rank

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.count_gt.nbytes + self.count_ge.nbytes)

    def threshold(self, density: float) -> tuple[float, float]:
        """(value, tie_fraction) that keeps about keep_count(density) entries via `keep_above`."""
        if density >= 1:
            return float("-inf"), 1.0
        return self.for_count(keep_count(density, self.numel))

    def for_count(self, k: int) -> tuple[float, float]:
        """(value, tie_fraction) that keeps about the `k` largest magnitudes (0: none; numel: all)."""
        if k <= 0:
            return float("inf"), 0.0
        if k >= self.numel:
            return float("-inf"), 1.0
        i = int(np.searchsorted(self.count_ge, k, side="left"))  # first sample whose block reaches k
        gt, ge = int(self.count_gt[i]), int(self.count_ge[i])
        if gt < k:  # k falls inside the block of entries equal to values[i]
            return float(self.values[i]), (k - gt) / (ge - gt)
        # k lies strictly between the blocks of samples i-1 and i: no ties in between, interpolate
        hi_val, lo_val = float(self.values[i - 1]), float(self.values[i])
        before = int(self.count_ge[i - 1])
        frac = (k - before) / (gt - before + 1)
        return hi_val + (lo_val - hi_val) * frac, 0.0
