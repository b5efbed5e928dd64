"""Passthrough: one model's tensors as they are, optionally scaled (mergekit's `scale`); what frankenmerge
slices stack. Nothing to search."""

from evomerge.merge.methods.base import MergeMethod, Param

METHOD = MergeMethod(
    name="passthrough",
    summary="one model as it is (times scale)",
    params=(Param("scale", per_input=True, default=1.0),),
    exact=lambda name, base, models, p: models[0].float() * p["scale"][0],
    needs_base=False,
    inputs=1,
)
