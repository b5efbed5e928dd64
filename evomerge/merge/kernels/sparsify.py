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

from evomerge.merge.kernels.rng import CHUNK, uniform_from_index, uniform_table

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
    ranks = row_ranks(delta)
    uniform = uniform_table(key, ranks.numel(), ranks.device).view(ranks.shape)
    keep = magprune_keep(ranks, ranks.shape[1] - 1, density - epsilon, epsilon, uniform)
    return keep.reshape(delta.shape)


def pack_ranks(ranks: torch.Tensor) -> torch.Tensor:
    """`row_ranks` flattened, in int32 words the compiled kernels read at full speed: two ranks a word when
    they fit 15 bits and the tensor is a single rng chunk (entry i in the low half of word i, entry
    i + h in the high half, h = ceil(n / 2); 2 bytes an entry), else one rank a word. Inductor's CPU
    code converts int16 one element at a time, about 10x slower than this unpacking."""
    flat = ranks.reshape(-1).to(torch.int32)
    n = flat.numel()
    if ranks.dtype != torch.int16 or n >= CHUNK or n < 2:
        return flat
    half = (n + 1) // 2
    high = torch.zeros(half, dtype=torch.int32, device=flat.device)
    high[: n - half] = flat[half:]
    return flat[:half] | (high << 16)


def unpack_ranks(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n flat int32 ranks of `pack_ranks` (a tensor of n words is already one rank a word)."""
    if packed.numel() == n:
        return packed
    return torch.cat([packed & 0xFFFF, packed >> 16])[:n]


def magprune_keep(ranks: torch.Tensor, span, low, epsilon, uniform: torch.Tensor) -> torch.Tensor:
    """DELLA's keep decision as a 0/1 float from integer `row_ranks` (any shape, e.g. flat): keep with
    probability `low` (density - epsilon) at the smallest magnitude of a row, rising by 2 epsilon to its
    largest. `span` is the row length - 1: a row's ranks are a permutation of 0..L-1, so magprune's
    (r + 1 - min) / (max - min) is r / (L - 1), the same float32 values without the two reductions."""
    probs = low + (ranks.to(F32) / span).clamp(0, 1) * 2 * epsilon
    return torch.relu(torch.sign(probs - uniform))  # u < probs, as float arithmetic (see gta._positive)


def magprune_kept_l1(
    base: torch.Tensor,
    models: list[torch.Tensor],
    ranks: list[torch.Tensor],
    span: torch.Tensor,
    lows: torch.Tensor,
    epsilons: torch.Tensor,
    keys: torch.Tensor,
) -> torch.Tensor:
    """The L1 norm of each task vector's kept entries (float32, one per model): the first of DELLA's two
    passes, a reduction that writes nothing (the merge pass then draws the same keeps again: a hash is
    cheaper than writing and re-reading a mask). Flat inputs under 2^30 entries, ranks as `pack_ranks`
    gives them; `keys` int32, one per model; the rest float32 tensors."""
    b = base.to(F32)
    index = torch.arange(b.numel(), dtype=torch.int32, device=b.device).view(b.shape)
    sums = []
    for j, model in enumerate(models):
        delta = model.to(F32) - b
        rank = unpack_ranks(ranks[j], b.numel())
        keep = magprune_keep(rank, span, lows[j], epsilons[j], uniform_from_index(index, keys[j]))
        sums.append((delta * keep).abs().sum())
    return torch.stack(sums)


def l1_rescale(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> float:
    """The factor that gives the kept entries the L1 norm of the whole vector (1 when either is ~0)."""
    return l1_factor(delta.abs().sum(), (delta * mask).abs().sum(), eps)


def l1_factor(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-7) -> float:
    if before < eps or after < eps:
        return 1.0
    return float(before / after)


def l1_scales(before: torch.Tensor, after: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """l1_factor for a vector of models, on the device (no synchronisation per tensor)."""
    return torch.where((before < eps) | (after < eps), torch.ones_like(before), before / after)
