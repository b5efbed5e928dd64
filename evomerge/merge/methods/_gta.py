"""The task-vector family's shared pieces: mergekit's parameter list for it, and the engine's one-pass path
(kernels/gta.py) for each way of keeping entries. Each family member is still its own module."""

from __future__ import annotations

from dataclasses import replace
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


def precompute_thresholds(name: str, base, models, eager: bool):
    """TIES: each task vector's sorted magnitudes (a threshold for any density), and, for eager kernels,
    the tie-break uniforms (fixed keys: hashed once here instead of per candidate)."""
    b = base.float()
    tables = [K.trim.ThresholdTable((m.float() - b).abs()) for m in models]
    uniforms = (
        [K.rng.uniform_table(k, b.numel(), b.device) for k in tie_keys(name, len(models))] if eager else None
    )
    return tables, uniforms


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


def _sparsified(out, base, models, p: TensorParams, trim, consensus: bool, kernel=None):
    """Trim each task vector by `trim(j, model, base_f32) -> (mask, scale)`, then the shared task-vector
    pass with the kept entries scaled (mergekit's sparsify: with `rescale`, to the vector's L1 norm)."""
    b = base.float()
    trimmed = [trim(j, m, b) for j, m in enumerate(models)]
    return K.gta.gta_apply(
        out, base, models, p["weight"], mode="mask", masks=[m for m, _ in trimmed],
        scales=[s for _, s in trimmed], consensus=consensus, normalize=p["normalize"], lam=p["lambda"],
        kernel=kernel or K.gta.gta_into,
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
    by hash); with `rescale` (an L1 sum per candidate) it runs the exact kernel."""
    exact = sparsified_exact(
        lambda j, delta, p, tensor: K.sparsify.outlier_mask(delta, p["density"][j], p["gamma"][j]), consensus
    )

    def fast(kernels, out, base, models, p, tensor, state) -> None:
        if p["rescale"] and any(d < 1 for d in p["density"]):
            out.copy_(exact(tensor, base, models, p))
            return
        tables, uniforms = state
        cuts = [band_cuts(t, d, g) for t, d, g in zip(tables, p["density"], p["gamma"], strict=True)]
        lower, upper = [c[0] for c in cuts], [c[1] for c in cuts]
        strict_lower, strict_upper = K.trim.strict_thresholds(lower), K.trim.strict_thresholds(upper)
        if strict_lower is not None and strict_upper is not None:
            _run(kernels, out, base, models, p, consensus, mode="band", thresholds=strict_lower,
                 upper=strict_upper)  # fmt: skip
            return
        _run(kernels, out, base, models, p, consensus, mode="band", thresholds=[c[0] for c in lower],
             tie_probs=[c[1] for c in lower], upper=[c[0] for c in upper], upper_tie_probs=[c[1] for c in upper],
             keys=tie_keys(tensor, len(models)), uniforms=uniforms if kernels.eager else None)  # fmt: skip

    return MergeMethod(
        name=name,
        summary="drop the largest and smallest task-vector entries"
        + (", sign election" if consensus else ""),
        params=gta_params(normalize=False, rescale=False, extra=(GAMMA,)),
        exact=exact,
        fast=fast,
        precompute=precompute_thresholds,
        state_bytes=threshold_bytes,
        baseline=default_baseline,
    )


def della_method(name: str, *, consensus: bool) -> MergeMethod:
    """DELLA, summed or with sign election (normalized by default then, as mergekit). The search keeps
    each task vector's per-row magnitude ranks (2 bytes an entry for rows up to 32k), so a candidate
    costs one pass per task vector (draws, mask and L1 sums: `magprune_trim`, compiled with the engine's
    kernels) and the merge pass, instead of two argsorts: eagerly, the exact kernel's bits."""

    def della_trim(kernels, p, tensor, ranks_of):
        import torch

        def trim(j, m, b):
            density, epsilon = p["density"][j], p["epsilon"][j]
            if density >= 1:
                return m.new_ones(m.shape, dtype=torch.float32), 1.0
            key = K.rng.derive_key(p.seed, tensor, j)
            ranks = ranks_of(j, m, b)
            if ranks.numel() >= K.rng.CHUNK:  # chunked draws: the general path
                delta = m.float() - b
                mask = K.sparsify.magprune_from_ranks(ranks, density, epsilon, key).reshape(delta.shape)
                return mask, K.sparsify.l1_rescale(delta, mask) if p["rescale"] else 1.0
            f32 = dict(dtype=torch.float32, device=m.device)
            keep, before, after = kernels(K.sparsify.magprune_trim)(
                m, b, ranks, torch.tensor(density - epsilon, **f32), torch.tensor(epsilon, **f32),
                torch.tensor(key, dtype=torch.int32, device=m.device),
            )  # fmt: skip
            return keep, K.sparsify.l1_factor(before, after) if p["rescale"] else 1.0

        return trim

    def exact(tensor, base, models, p):
        def ranks_of(j, m, b):
            return K.sparsify.row_ranks(m.float() - b)

        trim = della_trim(lambda fn: fn, p, tensor, ranks_of)
        return _sparsified(empty_like_f32(base), base, models, p, trim, consensus)

    def precompute(tensor, base, models, eager):
        b = base.float()
        return [K.sparsify.row_ranks(m.float() - b) for m in models]

    def fast(kernels, out, base, models, p, tensor, ranks) -> None:
        trim = della_trim(kernels, p, tensor, lambda j, m, b: ranks[j])
        _sparsified(out, base, models, p, trim, consensus, kernel=kernels(K.gta.gta_into))

    return MergeMethod(
        name=name,
        summary="magnitude-ranked random drop, L1 rescale" + (", sign election" if consensus else ""),
        params=gta_params(normalize=consensus, rescale=True, extra=(EPSILON,)),
        exact=exact,
        fast=fast,
        precompute=precompute,
        state_bytes=lambda numel, row, inputs: inputs * numel * (2 if row <= 32767 else 4),
        baseline=default_baseline,
        random=True,
        check=check_epsilon,
        repair=repair_epsilon,
    )
