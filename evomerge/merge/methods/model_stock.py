"""Model Stock (Jang et al., 2024): the base moved towards the fine-tunes' average by a ratio from the
angle between their task vectors (per tensor, or per row with `filter_wise`). No per-model parameter:
not searchable, a baseline."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param

METHOD = MergeMethod(
    name="model_stock",
    summary="base towards the average, by the task vectors' angle",
    params=(Param("filter_wise", kind=bool, default=False),),
    exact=lambda name, base, models, p: kernels.stock.model_stock(base, models, filter_wise=p["filter_wise"]),
    min_inputs=2,
    baseline=lambda n: {},
)
