"""Arcee Fusion and RAM, as mergekit 0.1.5 computes them.

- arcee_fusion: take the fine-tune's change only where it matters: importance = |change| x the KL
  divergence of the fine-tune's softmax from the base's along the last dimension; kept where importance
  reaches median + 1.5 IQR of its values. mergekit estimates the quartiles from 1M entries drawn with
  torch's global RNG on larger tensors; here the draw is a counter hash keyed by the tensor's name
  (deterministic; the same as mergekit's wherever a tensor has at most 1M entries).
- ram (Reinforced Agent Merging): entries only one task vector changes (beyond epsilon) are taken whole,
  entries several change are averaged over those that do; ramplus_tl scales the unique entries by
  1 + r * clamp(shared / unique, 0, alpha) per task vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.kernels.rng import derive_key, uniform_table

F32 = torch.float32
QUANTILE_SAMPLE = 1_000_000


def arcee_fusion(base: torch.Tensor, model: torch.Tensor, *, key: str = "") -> torch.Tensor:
    b, m = base.to(F32), model.to(F32)
    p = torch.softmax(m, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    importance = (m - b).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        u = uniform_table(derive_key("arcee_fusion", key), QUANTILE_SAMPLE, flat.device)
        flat = flat[(u * flat.numel()).long().clamp(max=flat.numel() - 1)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[
        (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long().to(ordered.device)
    ]
    mask = (importance >= median + 1.5 * (q3 - q1)).to(F32)
    return b + (m - b) * mask


def ram(
    base: torch.Tensor, models: Sequence[torch.Tensor], *, epsilon: float = 1e-5, r: float | None = None,
    alpha: float = 0.2,
) -> torch.Tensor:  # fmt: skip
    """`r` None: RAM; else RAM+ (tensor-local) with its r and alpha."""
    b = base.to(F32)
    if not models:
        return b.clone()
    tv = torch.stack([m.to(F32) - b for m in models]).reshape(len(models), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    kept = tv * nonzero
    scale = 1.0
    if r is not None:
        rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
        scale = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    merged = (kept * unique * scale + kept * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)
