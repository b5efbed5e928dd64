"""DARE (Yu et al., 2023): drop each task-vector entry with probability 1 - density and rescale the
survivors by 1/density; `dare_ties` then elects signs as TIES does, `dare_linear` sums.

The drop mask is a pure function of (key, element index) (see rng.py): one key per task vector gives the
same mask on CPU and GPU, in any process."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.kernels.gta import F32, gta_apply


def _dare(base, models, weights, densities, keys, consensus, normalize, rescale, lam) -> torch.Tensor:
    out = torch.empty(base.shape, dtype=F32, device=base.device)
    return gta_apply(
        out, base, models, weights, mode="random", probs=densities, keys=keys,
        consensus=consensus, normalize=normalize, lam=lam, rescale=rescale,
    )  # fmt: skip


def dare_linear(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Sequence[int],
    *,
    normalize: bool = False,
    rescale: bool = True,
    lam: float = 1.0,
) -> torch.Tensor:
    return _dare(base, models, weights, densities, keys, False, normalize, rescale, lam)


def dare_ties(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    keys: Sequence[int],
    *,
    normalize: bool = False,
    rescale: bool = True,
    lam: float = 1.0,
) -> torch.Tensor:
    return _dare(base, models, weights, densities, keys, True, normalize, rescale, lam)
