"""SLERP: spherical interpolation between two tensors, each flattened to one vector.

The angle depends only on the two inputs, so `slerp_dot` can be computed once and a candidate's merge
is a single weighted sum with `slerp_coefficients(dot, t)`. Nearly colinear (or antipodal) pairs fall back
to linear interpolation, as does a zero vector.
"""

from __future__ import annotations

import math

import torch

F32 = torch.float32
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp_dot(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> float:
    """Cosine of the angle between the flattened tensors (norms below eps count as 1)."""
    x, y = a.reshape(-1).to(F32), b.reshape(-1).to(F32)
    if x.numel() == 0:
        return 1.0
    norm_x, norm_y = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    norm_x = norm_x if norm_x > eps else 1.0
    norm_y = norm_y if norm_y > eps else 1.0
    dot = float(((x / norm_x) * (y / norm_y)).sum())
    return min(1.0, max(-1.0, dot))


def slerp_coefficients(dot: float, t: float, dot_threshold: float = DOT_THRESHOLD) -> tuple[float, float]:
    """Weights of (a, b) in the interpolated result."""
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def lerp_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coefs: torch.Tensor) -> None:
    out.copy_(a.to(F32) * coefs[0] + b.to(F32) * coefs[1])


def slerp(
    t: float, a: torch.Tensor, b: torch.Tensor, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS
) -> torch.Tensor:
    """t = 0 gives a, t = 1 gives b."""
    coefs = slerp_coefficients(slerp_dot(a, b, eps), t, dot_threshold)
    out = torch.empty(a.shape, dtype=F32, device=a.device)
    lerp_into(out, a, b, torch.tensor(coefs, dtype=F32, device=a.device))
    return out
