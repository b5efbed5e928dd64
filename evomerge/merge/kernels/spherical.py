"""Interpolation on the sphere of several models (Multi-SLERP, Goddard 2024): project the unit task vectors
(or models, without a base) onto the tangent space at their weighted mean direction, average there, map
back, and scale by the weighted mean norm. Follows mergekit 0.1.5's multislerp step by step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

F32 = torch.float32


def multislerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    if len(models) == 1:  # mergekit returns the one model as it is (no base added back)
        return models[0].to(F32).clone()
    stacked = torch.stack([m.to(F32) for m in models])
    if base is not None:
        stacked = stacked - base.to(F32)
    flat = stacked.reshape(stacked.shape[0], -1)
    w = torch.tensor(list(weights), dtype=F32, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if flat.shape[0] != 2:
            raise ValueError("multislerp: the weighted sum of the inputs is zero (antipodal inputs)")
        result = (stacked[0] * w[0] + stacked[1] * w[1]).reshape(stacked.shape[1:])
        return result + base.to(F32) if base is not None else result
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    length = tangent.norm() + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * w).sum()).reshape(stacked.shape[1:])
    return result + base.to(F32) if base is not None else result


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, *, dim: int = -1, eps: float = 1e-8, flatten: bool = False
) -> torch.Tensor:
    """SLERP along rows (dim 0), columns (dim -1) or the flattened tensor, as mergekit's nuslerp."""
    shape = v0.shape
    v0, v1 = v0.to(F32), v1.to(F32)
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def karcher(
    models: Sequence[torch.Tensor], alphas: Sequence[float], *, max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean of the models' directions on the unit sphere, by fixed-point
    iteration, scaled by their weighted mean norm; mergekit's karcher step by step."""
    tensors = [m.to(F32) for m in models]
    if len(tensors) == 1:
        return tensors[0].clone()
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [units[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units, strict=True):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        length = torch.linalg.vector_norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean
