"""The subspace merges' shared pieces (TSV-M, Iso-C, Iso-CTS, WUDI: kernels/subspace.py): each computes
one merged task vector per tensor that does not depend on the searched scale, so the search computes it
once per tensor (on the first candidate, with the experiment's fixed settings) and every candidate is
base + scale * that vector. `exclude` (true for a tensor: set per tensor by the experiment's
`merge.exclude` substrings, or by a filter in a merge config) gives the tensor the task vectors' mean
instead of the matrix treatment, as FusionBench does for its `exclude_keys` and for 1-D tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evomerge.merge.methods.base import Param, TensorParams

if TYPE_CHECKING:
    import torch

EXCLUDE = Param("exclude", kind=bool, default=False)

# (tensor name, task vectors, params) -> the merged task vector of a 2-D tensor
Kernel = Callable[[str, list, TensorParams], "torch.Tensor"]


def merged_tv(kernel: Kernel, name: str, base, models, p: TensorParams) -> torch.Tensor:
    """The tensor's merged task vector (float32): the kernel's for a 2-D tensor not excluded, else the
    mean of the task vectors."""
    from evomerge.merge.kernels import subspace

    tvs = [m.float() - base.float() for m in models]
    if base.dim() == 2 and not p["exclude"]:
        return kernel(name, tvs, p)
    return subspace.mean_tv(tvs)


def exact(kernel: Kernel, scale: str | None) -> Callable:
    def run(name: str, base, models, p: TensorParams) -> torch.Tensor:
        tv = merged_tv(kernel, name, base, models, p)
        return base.float() + (tv if scale is None else p[scale] * tv)

    return run


def fast(kernel: Kernel, scale: str | None, fixed: tuple[str, ...]) -> Callable:
    """The search's path: the merged task vector cached per tensor (keyed by the fixed settings, which do
    not change within a run), then one fused base + scale * tv per candidate."""

    def run(kernels_, out, base, models, p: TensorParams, name: str, state: dict[str, Any]) -> None:
        key = tuple(p[k] for k in ("exclude", *fixed))
        if state.get("key") != key:  # kept where the engine keeps the sources (host placement: the host)
            state["tv"] = merged_tv(kernel, name, base, models, p).to(state["home"])
            state["key"] = key
        tv = state["tv"].to(out.device)
        out.copy_(base.float() + (tv if scale is None else p[scale] * tv))

    return run


def precompute(name, base, models, eager) -> dict[str, Any]:
    return {"home": base.device}  # the merged task vector is added by the first candidate (see `fast`)


def state_bytes(numel: int, row: int, count: int) -> int:
    return 4 * numel  # the merged task vector, float32
