"""The shared core of the task-vector methods (task arithmetic, TIES, DARE): one elementwise pass.

Every method in the family is: task vectors d_j = model_j - base, keep some entries of each, weight them,
optionally elect a sign per entry and keep only agreeing entries, sum, optionally normalise by the summed
weights, scale by lambda, add to the base. `gta_into` does that in float32 and writes the result into
`out` in `out`'s dtype. It is written so that torch.compile fuses it into one pass over memory; the exact
functional kernels call the same function eagerly, so the fast path and the exact path share their math.

keep modes: "all" (no trim), "mask" (given bool masks), "threshold" (precomputed top-k threshold t_j with
tie fraction q_j: |d| > t_j, or |d| == t_j and hash < q_j; see trim.ThresholdTable; without tie fractions
and keys, a plain |d| > t_j: see trim.strict_thresholds), "band" (kept by a threshold and not by a second,
`upper` one: breadcrumbs' magnitudes between two ranks), "random" (DARE: counter-hash uniform < p_j,
optionally rescaled by 1/p_j), "ranked" (DELLA: counter-hash uniform < a probability from the entry's
magnitude rank in its row, see sparsify.magprune_keep). The hashed modes take one key per model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.kernels.rng import chunks, uniform_from_index
from evomerge.merge.kernels.sparsify import magprune_keep, unpack_ranks

F32 = torch.float32


def _positive(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x > 0, else 0.0. Float arithmetic instead of a compare: on a CPU, eager ops that make or
    read bool tensors (compare, where) cost 4-15x a float op, and this kernel is all such choices."""
    return torch.relu(torch.sign(x))


def _above(magnitude: torch.Tensor, value, tie_prob, u) -> torch.Tensor:
    """trim.keep_above as a 0/1 float: |d| > value, or |d| == value and u < tie_prob (no tie_prob: no ties)."""
    if tie_prob is None:
        return _positive(magnitude - value)
    side = torch.sign(magnitude - value)
    return torch.relu(side) + (1.0 - side.abs()) * _positive(tie_prob - u)


def _cut_keep(magnitude, j: int, lower, lower_ties, upper, upper_ties, u) -> torch.Tensor:
    """Model j's keep factor by its cut (`threshold` mode) or, with an upper cut, its band (`band` mode:
    minus the largest entries, breadcrumbs' outliers, by the same rule)."""
    keep = _above(magnitude, lower[j], None if lower_ties is None else lower_ties[j], u)
    if upper is not None:
        keep = keep - _above(magnitude, upper[j], None if upper_ties is None else upper_ties[j], u)
    return keep


def band_kept_l1(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    upper: torch.Tensor,
    tie_probs: torch.Tensor | None = None,
    upper_tie_probs: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    uniforms: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each task vector's L1 norm over the entries its band keeps (breadcrumbs' rescale needs it before the
    merge pass can weight the vector): one reduction over all of them, the merge pass's keep rule."""
    b = base.to(F32)
    if keys is not None and uniforms is None:
        index = torch.arange(b.numel(), dtype=torch.int32, device=b.device).view(b.shape)
    sums = []
    for j, model in enumerate(models):
        u = None
        if tie_probs is not None:
            u = uniforms[j] if uniforms is not None else uniform_from_index(index, keys[j])
        magnitude = (model.to(F32) - b).abs()
        sums.append(
            (magnitude * _cut_keep(magnitude, j, thresholds, tie_probs, upper, upper_tie_probs, u)).sum()
        )
    return torch.stack(sums)


def gta_into(
    out: torch.Tensor,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: torch.Tensor,
    mode: str,
    consensus: bool,
    normalize: bool,
    lam: torch.Tensor,
    thresholds: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    masks: Sequence[torch.Tensor] | None = None,
    rescale: bool = False,
    tie_probs: torch.Tensor | None = None,
    uniforms: Sequence[torch.Tensor] | None = None,
    scales: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    upper_tie_probs: torch.Tensor | None = None,
    ranks: Sequence[torch.Tensor] | None = None,
    span: torch.Tensor | None = None,
    epsilons: torch.Tensor | None = None,
) -> None:
    # Every keep decision is a 0/1 float factor. sign(a - b) is the sign of the exact difference for finite
    # floats (a difference of distinct floats never rounds to zero), so each factor equals the compare it
    # replaces; a dropped entry becomes delta * 0 (a zero, perhaps -0.0) where a select would give +0.0.
    b = base.to(F32)
    if keys is not None and uniforms is None:  # generated inside so a compiled kernel fuses it into the pass
        index = torch.arange(b.numel(), dtype=torch.int32, device=b.device).view(b.shape)
    contributions = []
    for j, model in enumerate(models):
        delta = model.to(F32) - b
        coef = weights[j] / probs[j] if (mode == "random" and rescale) else weights[j]
        if scales is not None:  # a per-model rescale of the kept entries (breadcrumbs, DELLA: L1)
            coef = coef * scales[j]
        if mode == "all":
            contributions.append(delta * coef)
            continue
        if mode in ("threshold", "band"):  # |d| > t_j, or |d| == t_j and u < q_j (see trim.ThresholdTable)
            u = None
            if tie_probs is not None:
                u = uniforms[j] if uniforms is not None else uniform_from_index(index, keys[j])
            bounds = (upper, upper_tie_probs) if mode == "band" else (None, None)
            keep = _cut_keep(delta.abs(), j, thresholds, tie_probs, *bounds, u)
        elif mode == "random":
            keep = _positive(probs[j] - uniform_from_index(index, keys[j]))
        elif mode == "ranked":  # probs: each model's keep probability at the smallest magnitude of a row
            rank = unpack_ranks(ranks[j], b.numel())
            keep = magprune_keep(rank, span, probs[j], epsilons[j], uniform_from_index(index, keys[j]))
        elif mode == "mask":
            keep = masks[j].to(F32)
        else:
            raise ValueError(f"unknown keep mode {mode}")
        contributions.append(delta * coef * keep)

    total = contributions[0]
    for c in contributions[1:]:
        total = total + c
    if consensus:
        sign = torch.sign(torch.sign(total) + 0.5)  # the elected sign: +1 where total >= 0, else -1
        mixed = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for j, c in enumerate(contributions):
            agree = _positive(c * sign)  # nonzero and of the elected sign
            mixed = mixed + c * agree
            divisor = divisor + weights[j] * agree
        divisor = divisor + (1.0 - torch.sign(divisor).abs())  # 1 where no model agrees
    else:
        mixed = total
        divisor = weights.sum()
        divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    out.copy_(b + mixed * lam)


def gta_apply(
    out: torch.Tensor,
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor,
    *,
    mode: str,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
    thresholds: Sequence[float] | None = None,
    probs: Sequence[float] | None = None,
    keys: Sequence[int] | None = None,
    masks: Sequence[torch.Tensor] | None = None,
    rescale: bool = False,
    tie_probs: Sequence[float] | None = None,
    uniforms: Sequence[torch.Tensor] | None = None,
    scales: Sequence[float] | None = None,
    upper: Sequence[float] | None = None,
    upper_tie_probs: Sequence[float] | None = None,
    ranks: Sequence[torch.Tensor] | None = None,
    span: float | None = None,
    epsilons: Sequence[float] | None = None,
    kernel=gta_into,
) -> torch.Tensor:
    """Run `kernel` (gta_into, or a compiled copy of it) on flat views; hashed modes go in chunks of
    at most rng.CHUNK elements, each with its own key, so int32 element indices never overflow.
    `uniforms` (flat, from rng.uniform_table) stand in for the tie keys' hash when precomputed."""
    device = base.device
    vec = lambda values, dtype=F32: torch.as_tensor(values, dtype=dtype, device=device)  # noqa: E731
    args = dict(
        weights=vec(weights),
        mode=mode,
        consensus=consensus,
        normalize=normalize,
        lam=vec(lam),
        thresholds=None if thresholds is None else vec(thresholds),
        probs=None if probs is None else vec(probs),
        tie_probs=None if tie_probs is None else vec(tie_probs),
        masks=None if masks is None else [m.reshape(-1) for m in masks],
        rescale=rescale,
        scales=None if scales is None else vec(scales),
        upper=None if upper is None else vec(upper),
        upper_tie_probs=None if upper_tie_probs is None else vec(upper_tie_probs),
        span=None if span is None else vec(span),
        epsilons=None if epsilons is None else vec(epsilons),
    )
    flat_ranks = None if ranks is None else [r.reshape(-1) for r in ranks]
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_models = [m.reshape(-1) for m in models]
    if keys is None or uniforms is not None:  # precomputed uniforms replace the keys' hash
        kernel(flat_out, flat_base, flat_models, uniforms=uniforms, ranks=flat_ranks, **args)
        return out
    for start, stop, chunk_key in chunks(keys, flat_base.numel()):
        kernel(
            flat_out[start:stop],
            flat_base[start:stop],
            [m[start:stop] for m in flat_models],
            keys=vec(chunk_key, torch.int32),
            ranks=None if flat_ranks is None else [r[start:stop] for r in flat_ranks],
            **args,
        )
    return out
