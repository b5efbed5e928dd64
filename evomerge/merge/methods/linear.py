"""Linear: the weighted average of the models themselves (no base, no task vectors)."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param


def _fast(kernels_, out, base, models, p, name, state) -> None:
    import torch

    weights = torch.tensor(p["weight"], dtype=torch.float32, device=out.device)
    kernels_(kernels.linear_into)(out, models, weights, p["normalize"])


def _check(p, where: str) -> None:
    from evomerge.errors import UserError

    if p["normalize"] and abs(sum(p["weight"])) < 1e-8:
        raise UserError(f"{where}: linear weights sum to 0, cannot normalize")


METHOD = MergeMethod(
    name="linear",
    summary="weighted average of the models",
    params=(Param("weight", per_input=True, gene=(0.0, 1.0)), Param("normalize", kind=bool, default=True)),
    exact=lambda name, base, models, p: kernels.linear.linear(models, p["weight"], normalize=p["normalize"]),
    needs_base=False,
    fast=_fast,
    baseline=lambda n: {"weight": 1.0 / n},
    finals=1,
    check=_check,
)
