"""RAM (Reinforced Agent Merging): entries changed by one task vector taken whole, entries changed by
several averaged over those that change them. Nothing to search: a baseline."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod, Param

METHOD = MergeMethod(
    name="ram",
    summary="unique changes whole, shared changes averaged",
    params=(Param("epsilon", default=1e-5, low=0.0),),
    exact=lambda name, base, models, p: kernels.fusion.ram(base, models, epsilon=p["epsilon"]),
    baseline=lambda n: {},
)
