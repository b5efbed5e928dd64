"""Arcee Fusion: the base, with the other model's changes kept only where their importance (change x
KL divergence of the softmaxed rows) is an outlier (median + 1.5 IQR). No parameter: a baseline."""

from evomerge.merge import kernels
from evomerge.merge.methods.base import MergeMethod

METHOD = MergeMethod(
    name="arcee_fusion",
    summary="the other model's changes where they matter most",
    params=(),
    exact=lambda name, base, models, p: kernels.fusion.arcee_fusion(base, models[0], key=name),
    inputs=1,
    baseline=lambda n: {},
)
