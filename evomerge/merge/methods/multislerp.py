"""Multi-SLERP (Goddard, 2024): barycentric interpolation of several models on the sphere, of their task
vectors when a base is given.

The search's path is one weighted sum. In mergekit's formula the tangent it adds to the normalised
weighted mean of the unit vectors is zero in exact arithmetic (the weighted mean of u_j - (u_j . M) M is
m - |m| M = 0, for m = sum_j w_j u_j and M = m / |m|), so the result is (sum_j w_j |d_j|) M. The norms
|d_j| and the dot products d_j . d_k do not depend on the candidate and are computed once; per candidate
|m| comes from them, and the tensor is written in one pass. It equals the exact kernel up to float
rounding (the exact one carries the tangent's rounding noise, about 1e-7 relative).
"""

from __future__ import annotations

import math

from evomerge.merge import kernels as K  # loaded on first use: the registry loads without torch
from evomerge.merge.methods.base import MergeMethod, Param


def _precompute(name: str, base, models, eager: bool):
    """Each vector's norm and the Gram matrix of dot products (float64 numbers), for any weights."""
    if len(models) < 2:
        return None
    import torch

    b = base.float().reshape(-1) if base is not None else None
    flat = [m.float().reshape(-1) - b if b is not None else m.float().reshape(-1) for m in models]
    norms = [float(v.norm()) for v in flat]
    gram = [[float(torch.dot(u, v)) for v in flat] for u in flat]
    return norms, gram


def _fast(kernels, out, base, models, p, name, state) -> None:
    eps = p["eps"]
    weights = list(p["weight"])
    if p["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    if state is None:
        out.copy_(METHOD.exact(name, base, models, p))
        return
    norms, gram = state
    coef = [w / (n + eps) for w, n in zip(weights, norms, strict=True)]  # m = sum_j coef_j d_j
    squared = sum(
        ci * cj * g for ci, row in zip(coef, gram, strict=True) for cj, g in zip(coef, row, strict=True)
    )
    mean_norm = math.sqrt(max(squared, 0.0))
    if mean_norm < eps:  # antipodal inputs: the exact kernel's own rule
        out.copy_(METHOD.exact(name, base, models, p))
        return
    scale = sum(w * n for w, n in zip(weights, norms, strict=True)) * math.cos(eps) / mean_norm
    factors = [c * scale for c in coef]
    if base is None:
        import torch

        weights = torch.tensor(factors, dtype=torch.float32, device=out.device)
        kernels(K.linear_into)(out, models, weights, False)
        return
    K.gta.gta_apply(
        out,
        base,
        models,
        factors,
        mode="all",
        consensus=False,
        normalize=False,
        kernel=kernels(K.gta.gta_into),
    )


def _check(p, where: str) -> None:
    from evomerge.errors import UserError

    if p["normalize_weights"] and abs(sum(p["weight"])) < 1e-8:
        raise UserError(f"{where}: multislerp weights sum to 0, cannot normalize")


METHOD = MergeMethod(
    name="multislerp",
    summary="weighted interpolation of several models on the sphere",
    params=(
        Param("weight", per_input=True, gene=(0.0, 1.0)),
        Param("normalize_weights", kind=bool, default=True),
        Param("eps", default=1e-8, low=0.0),
    ),
    exact=lambda name, base, models, p: K.spherical.multislerp(
        base, models, p["weight"], normalize_weights=p["normalize_weights"], eps=p["eps"]
    ),
    needs_base=False,
    optional_base=True,
    fast=_fast,
    precompute=_precompute,
    baseline=lambda n: {"weight": 1.0},
    check=_check,
)
