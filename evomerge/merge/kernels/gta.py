"""The shared core of the task-vector methods (task arithmetic, TIES, DARE): one elementwise pass.

Every method in the family is: task vectors d_j = model_j - base, keep some entries of each, weight them,
optionally elect a sign per entry and keep only agreeing entries, sum, optionally normalise by the summed
weights, scale by lambda, add to the base. `gta_into` does that in float32 and writes the result into
`out` in `out`'s dtype. It is written so that torch.compile fuses it into one pass over memory; the exact
functional kernels call the same function eagerly, so the fast path and the exact path share their math.

keep modes: "all" (no trim), "mask" (given bool masks), "threshold" (precomputed top-k threshold t_j with
tie fraction q_j: |d| > t_j, or |d| == t_j and hash < q_j; see trim.ThresholdTable), "random" (DARE:
counter-hash uniform < p_j, optionally rescaled by 1/p_j). Both hashed modes take one key per model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.merge.kernels.rng import chunk_keys, uniform_from_index
from evomerge.merge.kernels.trim import keep_above

F32 = torch.float32


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
) -> None:
    b = base.to(F32)
    if keys is not None:  # generated inside so a compiled kernel fuses it into the pass
        index = torch.arange(b.numel(), dtype=torch.int32, device=b.device).view(b.shape)
    contributions = []
    for j, model in enumerate(models):
        delta = model.to(F32) - b
        coef = weights[j] / probs[j] if (mode == "random" and rescale) else weights[j]
        if mode == "all":
            contributions.append(delta * coef)
            continue
        if mode == "threshold":
            keep = keep_above(delta.abs(), thresholds[j], tie_probs[j], uniform_from_index(index, keys[j]))
        elif mode == "random":
            keep = uniform_from_index(index, keys[j]) < probs[j]
        elif mode == "mask":
            keep = masks[j]
        else:
            raise ValueError(f"unknown keep mode {mode}")
        contributions.append(torch.where(keep, delta * coef, 0.0))

    total = contributions[0]
    for c in contributions[1:]:
        total = total + c
    if consensus:
        positive = total >= 0
        mixed = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for j, c in enumerate(contributions):
            agree = torch.where(positive, c > 0, c < 0)
            mixed = mixed + torch.where(agree, c, 0.0)
            divisor = divisor + torch.where(agree, weights[j], 0.0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
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
    kernel=gta_into,
) -> torch.Tensor:
    """Run `kernel` (gta_into, or a compiled copy of it) on flat views; hashed modes go in chunks of
    at most rng.CHUNK elements, each with its own key, so int32 element indices never overflow."""
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
    )
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_models = [m.reshape(-1) for m in models]
    if keys is None:
        kernel(flat_out, flat_base, flat_models, **args)
        return out
    numel = flat_base.numel()
    per_model = [chunk_keys(k, numel) for k in keys]
    for c, (start, stop, _) in enumerate(per_model[0]):
        chunk_key = vec([pm[c][2] for pm in per_model], torch.int32)
        kernel(
            flat_out[start:stop],
            flat_base[start:stop],
            [m[start:stop] for m in flat_models],
            keys=chunk_key,
            **args,
        )
    return out
