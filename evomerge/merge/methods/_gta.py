"""The task-vector family's shared pieces: mergekit's parameter list for it, and the engine's one-pass path
(kernels/gta.py) for each way of keeping entries. Each family member is still its own module."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.merge import kernels as K  # loaded on first use: the registry loads without torch
from evomerge.merge.methods.base import MergeMethod, Param, TensorParams, dare_keys, tie_keys

if TYPE_CHECKING:
    import torch

    from evomerge.merge.kernels.trim import ThresholdTable

WEIGHT = Param("weight", per_input=True, gene=(0.0, 1.0))
DENSITY = Param("density", per_input=True, default=1.0, low=0.0, high=1.0, open_low=True, gene=(0.1, 1.0))
LAMBDA = Param("lambda", default=1.0)
GAMMA = Param("gamma", per_input=True, default=0.01, low=0.0, high=1.0, gene=(0.0, 0.1))
EPSILON = Param("epsilon", per_input=True, default=0.15, low=0.0, high=1.0, gene=(0.01, 0.2))
INT8_MASK = Param("int8_mask", kind=bool, default=False)  # accepted as mergekit does; masks are exact here


def gta_params(*, normalize: bool, rescale: bool | None = None, trims: bool = True, extra=()) -> tuple:
    """weight, density, normalize, lambda, int8_mask (+ rescale when the method has it), mergekit's order.
    A method that does not `trim` still accepts density (mergekit does) but does not search it."""
    params = [WEIGHT, DENSITY if trims else replace(DENSITY, gene=None)]
    params += [Param("normalize", kind=bool, default=normalize), LAMBDA, INT8_MASK]
    if rescale is not None:
        params.append(Param("rescale", kind=bool, default=rescale))
    return tuple(params) + tuple(extra)


def full_density(params: TensorParams, where: str) -> None:
    if any(d != 1.0 for d in params["density"]):
        raise UserError(f"{where}: task_arithmetic does not trim; use ties or dare_* for density")


def check_epsilon(params: TensorParams, where: str) -> None:
    """DELLA's probabilities density ± epsilon must lie in (0, 1) wherever it trims (mergekit's rule)."""
    for d, e in zip(params["density"], params["epsilon"], strict=True):
        if d < 1 and not (d - e > 0 and d + e < 1):
            raise UserError(f"{where}: epsilon {e:g} with density {d:g}: density ± epsilon must be in (0, 1)")


def repair_epsilon(values: dict) -> dict:
    """A searched group made valid for DELLA: each epsilon shrunk inside its density's margin."""
    eps = tuple(
        e if d >= 1 else min(e, 0.999 * min(d, 1 - d))
        for d, e in zip(values["density"], values["epsilon"], strict=True)
    )
    return {**values, "epsilon": eps}


def default_baseline(n: int) -> dict:
    """Task vectors added at weight 1 (normalizing methods: their mean), trimming ones keeping half."""
    return {"weight": 1.0, "density": 0.5}


def _run(kernels, out, base, models, p: TensorParams, consensus: bool, **keep) -> None:
    K.gta.gta_apply(
        out, base, models, p["weight"], consensus=consensus, normalize=p["normalize"], lam=p["lambda"],
        kernel=kernels(K.gta.gta_into), **keep,
    )  # fmt: skip


def fast_all(consensus: bool):
    def fast(kernels, out, base, models, p, name, state) -> None:
        _run(kernels, out, base, models, p, consensus, mode="all")

    return fast


def fast_random(consensus: bool):
    """DARE: a counter-hash uniform per entry against the density, in the same pass."""

    def fast(kernels, out, base, models, p, name, state) -> None:
        keys = dare_keys(p.seed, name, len(models))
        _run(kernels, out, base, models, p, consensus, mode="random", probs=p["density"], keys=keys,
             rescale=p["rescale"])  # fmt: skip

    return fast


def precompute_thresholds(name: str, base, models, eager: bool, *, l1: bool = False):
    """TIES: each task vector's sorted magnitudes (a threshold for any density), and, for eager kernels,
    the tie-break uniforms (fixed keys: hashed once here instead of per candidate). `l1`: each vector's L1
    norm too (breadcrumbs' rescale), from the same magnitudes."""
    import torch

    b = base.float()
    tables, norms = [], []
    for m in models:  # one task vector's magnitudes at a time
        magnitude = (m.float() - b).abs()
        tables.append(K.trim.ThresholdTable(magnitude))
        if l1:
            norms.append(magnitude.sum())
    uniforms = (
        [K.rng.uniform_table(k, b.numel(), b.device) for k in tie_keys(name, len(models))] if eager else None
    )
    return (tables, uniforms, torch.stack(norms)) if l1 else (tables, uniforms)


def threshold_bytes(numel: int, row: int, inputs: int) -> int:
    return inputs * K.trim.ThresholdTable.estimate_nbytes(numel)


def fast_threshold(kernels, out, base, models, p, name, state) -> None:
    """TIES by threshold: top-k as one compare against the precomputed cut (ties broken by hash)."""
    tables, uniforms = state
    cuts = [table.threshold(d) for table, d in zip(tables, p["density"], strict=True)]
    strict = K.trim.strict_thresholds(cuts)
    if strict is not None:
        _run(kernels, out, base, models, p, True, mode="threshold", thresholds=strict)
        return
    _run(kernels, out, base, models, p, True, mode="threshold", thresholds=[c[0] for c in cuts],
         tie_probs=[c[1] for c in cuts], keys=tie_keys(name, len(models)),
         uniforms=uniforms if kernels.eager else None)  # fmt: skip


def empty_like_f32(base: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.empty(base.shape, dtype=torch.float32, device=base.device)


def _sparsified(out, base, models, p: TensorParams, trim, consensus: bool):
    """Trim each task vector by `trim(j, model, base_f32) -> (mask, scale)`, then the shared task-vector
    pass with the kept entries scaled (mergekit's sparsify: with `rescale`, to the vector's L1 norm)."""
    b = base.float()
    trimmed = [trim(j, m, b) for j, m in enumerate(models)]
    return K.gta.gta_apply(
        out, base, models, p["weight"], mode="mask", masks=[m for m, _ in trimmed],
        scales=[s for _, s in trimmed], consensus=consensus, normalize=p["normalize"], lam=p["lambda"],
    )  # fmt: skip


def sparsified_exact(mask_of, consensus: bool):
    """The exact kernel of a method that trims each task vector by `mask_of(j, delta, params, name)`."""

    def exact(name, base, models, p: TensorParams) -> torch.Tensor:
        def trim(j, m, b):
            delta = m.float() - b
            mask = mask_of(j, delta, p, name)
            rescale = p.get("rescale") and p["density"][j] < 1
            return mask, K.sparsify.l1_rescale(delta, mask) if rescale else 1.0

        return _sparsified(empty_like_f32(base), base, models, p, trim, consensus)

    return exact


def dare_method(name: str, *, consensus: bool, finals: int | None = None) -> MergeMethod:
    """DARE, summed or with sign election: counter-hash drop masks in the engine's one pass."""
    kernel = "dare_ties" if consensus else "dare_linear"
    return MergeMethod(
        name=name,
        summary="random drop and rescale" + (", sign election" if consensus else "") + ", in one pass",
        params=gta_params(normalize=False, rescale=True),
        exact=lambda tensor, base, models, p: getattr(K.dare, kernel)(
            base,
            models,
            p["weight"],
            p["density"],
            dare_keys(p.seed, tensor, len(models)),
            normalize=p["normalize"],
            rescale=p["rescale"],
            lam=p["lambda"],
        ),  # fmt: skip
        fast=fast_random(consensus=consensus),
        baseline=default_baseline,
        finals=finals,
        random=True,
    )


def band_cuts(table: ThresholdTable, density: float, gamma: float) -> tuple[tuple, tuple]:
    """Breadcrumbs' kept ranks as two top-k cuts: the (n - bottom) largest minus the (n - bottom - keep)
    largest, with kernels/sparsify.outlier_mask's counts."""
    n = table.numel
    if density >= 1:
        return (float("-inf"), 1.0), (float("inf"), 0.0)
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    return table.for_count(n - bottom), table.for_count(n - bottom - keep)


def breadcrumbs_method(name: str, *, consensus: bool) -> MergeMethod:
    """Model Breadcrumbs, summed or with sign election. The search trims by two cuts of the precomputed
    threshold tables (TIES's: exact on small tensors, within 0.1% of the kept count on large ones, ties
    by hash); with `rescale`, a reduction first takes each task vector's L1 norm over what its band keeps
    (the whole vector's norm is precomputed), then the merge pass scales the vector by their ratio."""
    exact = sparsified_exact(
        lambda j, delta, p, tensor: K.sparsify.outlier_mask(delta, p["density"][j], p["gamma"][j]), consensus
    )

    def fast(kernels, out, base, models, p, tensor, state) -> None:
        tables, uniforms, before = state
        cuts = [band_cuts(t, d, g) for t, d, g in zip(tables, p["density"], p["gamma"], strict=True)]
        lower, upper = [c[0] for c in cuts], [c[1] for c in cuts]
        strict_lower, strict_upper = K.trim.strict_thresholds(lower), K.trim.strict_thresholds(upper)
        if strict_lower is not None and strict_upper is not None:
            band = dict(thresholds=strict_lower, upper=strict_upper)
        else:
            band = dict(
                thresholds=[c[0] for c in lower], tie_probs=[c[1] for c in lower], upper=[c[0] for c in upper],
                upper_tie_probs=[c[1] for c in upper], keys=tie_keys(tensor, len(models)),
                uniforms=uniforms if kernels.eager else None,
            )  # fmt: skip
        trims = [d < 1 for d in p["density"]]
        scales = None
        if p["rescale"] and any(trims):
            scales = _rescales(before, _band_l1(kernels, base, models, **band), trims)
        _run(kernels, out, base, models, p, consensus, mode="band", scales=scales, **band)

    return MergeMethod(
        name=name,
        summary="drop the largest and smallest task-vector entries"
        + (", sign election" if consensus else ""),
        params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
        exact=exact,
        fast=fast,
        precompute=partial(precompute_thresholds, l1=True),
        state_bytes=lambda numel, row, inputs: threshold_bytes(numel, row, inputs) + 4 * inputs,
        baseline=default_baseline,
    )


def _rescales(before, after, trims: list[bool]):
    """Per task vector: the factor that gives its kept entries its whole L1 norm where it trims, else 1."""
    import torch

    return torch.where(torch.tensor(trims, device=before.device), K.sparsify.l1_scales(before, after), 1.0)


def _band_l1(kernels, base, models, *, thresholds, upper, tie_probs=None, upper_tie_probs=None, keys=None,
             uniforms=None):  # fmt: skip
    """gta.band_kept_l1 on flat views: hashed ties in the merge pass's rng chunks (or the precomputed
    uniforms, which stand for the whole tensor)."""
    import torch

    def vec(values):
        return None if values is None else torch.tensor(values, dtype=torch.float32, device=base.device)

    args = dict(
        thresholds=vec(thresholds),
        upper=vec(upper),
        tie_probs=vec(tie_probs),
        upper_tie_probs=vec(upper_tie_probs),
    )
    reduce = kernels(K.gta.band_kept_l1)
    if keys is None or uniforms is not None:
        return reduce(base.reshape(-1), [m.reshape(-1) for m in models], uniforms=uniforms, **args)
    return _summed_over_chunks(reduce, base, models, keys, **args)


def _summed_over_chunks(reduce, base, models, keys, per_model=None, **args):
    """`reduce` (one sum per model over a flat span) over the merge pass's rng chunks, each with its own
    keys, added up: so an L1 pass draws what the merge pass (gta_apply) draws. `per_model`: more flat
    per-model tensors, sliced like the models."""
    import torch

    flat_base, flat_models = base.reshape(-1), [m.reshape(-1) for m in models]
    per_model = {name: [t.reshape(-1) for t in tensors] for name, tensors in (per_model or {}).items()}
    total = None
    for start, stop, chunk_key in K.rng.chunks(keys, flat_base.numel()):
        part = reduce(
            flat_base[start:stop], [m[start:stop] for m in flat_models],
            keys=torch.tensor(chunk_key, dtype=torch.int32, device=base.device),
            **{name: [t[start:stop] for t in tensors] for name, tensors in per_model.items()}, **args,
        )  # fmt: skip
        total = part if total is None else total + part
    return total


def della_state_bytes(numel: int, row: int, inputs: int) -> int:
    """Packed row ranks (2 bytes an entry; 4 for rows over 32k and tensors of 2^30 entries or more, which
    are not packed) and an L1 norm per task vector."""
    packed = row <= 32767 and numel < 1 << 30  # kernels.rng.CHUNK, without importing torch here
    return inputs * (numel * (2 if packed else 4) + 4)


def della_method(name: str, *, consensus: bool) -> MergeMethod:
    """DELLA, summed or with sign election (normalized by default then, as mergekit). What does not depend
    on the candidate is kept: each task vector's per-row magnitude ranks (2 bytes an entry for rows up to
    32k) and its L1 norm. A candidate then costs two passes: the L1 norms of the kept entries (a reduction
    over all task vectors, `magprune_kept_l1`) and the merge pass, which draws the same keeps again
    (`ranked` mode). Exact and fast paths run the same functions; eagerly they give the same bits."""

    def merge(kernels, out, base, models, p: TensorParams, tensor: str, state) -> None:
        ranks, span, before = state
        density, epsilon = p["density"], p["epsilon"]
        trims = [d < 1 for d in density]
        # a task vector kept whole (density 1) draws with probability 2 > every uniform, and is not rescaled
        lows = [d - e if t else 2.0 for d, e, t in zip(density, epsilon, trims, strict=True)]
        epsilons = [e if t else 0.0 for e, t in zip(epsilon, trims, strict=True)]
        keys = [K.rng.derive_key(p.seed, tensor, j) for j in range(len(models))]
        scales = None
        if p["rescale"] and any(trims):
            scales = _rescales(
                before, _kept_l1(kernels, base, models, ranks, span, lows, epsilons, keys), trims
            )
        K.gta.gta_apply(
            out, base, models, p["weight"], mode="ranked", ranks=ranks, span=span, probs=lows, epsilons=epsilons,
            keys=keys, scales=scales, consensus=consensus, normalize=p["normalize"], lam=p["lambda"],
            kernel=kernels(K.gta.gta_into),
        )  # fmt: skip

    def precompute(tensor, base, models, eager):
        import torch

        b = base.float()
        deltas = [m.float() - b for m in models]
        ranks = [K.sparsify.row_ranks(d) for d in deltas]
        span = ranks[0].shape[-1] - 1
        return [K.sparsify.pack_ranks(r) for r in ranks], span, torch.stack([d.abs().sum() for d in deltas])

    def exact(tensor, base, models, p):
        out = empty_like_f32(base)
        merge(lambda fn: fn, out, base, models, p, tensor, precompute(tensor, base, models, True))
        return out

    return MergeMethod(
        name=name,
        summary="magnitude-ranked random drop, L1 rescale" + (", sign election" if consensus else ""),
        params=gta_params(normalize=consensus, rescale=True, extra=(EPSILON,)),
        exact=exact,
        fast=merge,
        precompute=precompute,
        state_bytes=della_state_bytes,
        baseline=default_baseline,
        random=True,
        check=check_epsilon,
        repair=repair_epsilon,
    )


def _kept_l1(kernels, base, models, ranks, span: int, lows, epsilons, keys):
    """magprune_kept_l1 over the merge pass's rng chunks (packed ranks: one chunk, the slice is the whole)."""
    import torch

    f32 = dict(dtype=torch.float32, device=base.device)
    return _summed_over_chunks(
        kernels(K.sparsify.magprune_kept_l1), base, models, keys, per_model={"ranks": ranks},
        span=torch.tensor(span, **f32), lows=torch.tensor(lows, **f32), epsilons=torch.tensor(epsilons, **f32),
    )  # fmt: skip
