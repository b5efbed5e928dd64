"""SCE (Wan et al., 2024): keep the entries where the task vectors vary most (`select_topk`), weight each
task vector by its mean square, erase sign disagreements, merge. Per-tensor reductions (variance, top-k,
mean squares): the search runs the exact kernel; `select_topk` is its one gene per block."""

from evomerge.merge import kernels
from evomerge.merge.methods._gta import INT8_MASK
from evomerge.merge.methods.base import MergeMethod, Param

METHOD = MergeMethod(
    name="sce",
    summary="variance-selected entries, mean-square weights, sign election",
    params=(INT8_MASK, Param("select_topk", default=1.0, low=0.0, high=1.0, gene=(0.1, 1.0))),
    exact=lambda name, base, models, p: kernels.sce.sce(base, models, select_topk=p["select_topk"]),
    baseline=lambda n: {"select_topk": 1.0},
)
