"""DARE (Yu et al., 2023), summed: drop each task-vector entry with probability
1 - density (a counter-hash mask keyed by the candidate's seed) and rescale the survivors by 1/density."""

from evomerge.merge import kernels
from evomerge.merge.methods._gta import default_baseline, fast_random, gta_params
from evomerge.merge.methods.base import MergeMethod, dare_keys

METHOD = MergeMethod(
    name="dare_linear",
    summary="random drop and rescale, in one pass",
    params=gta_params(normalize=False, rescale=True),
    exact=lambda name, base, models, p: kernels.dare_linear(
        base,
        models,
        p["weight"],
        p["density"],
        dare_keys(p.seed, name, len(models)),
        normalize=p["normalize"],
        rescale=p["rescale"],
        lam=p["lambda"],
    ),  # fmt: skip
    fast=fast_random(consensus=False),
    baseline=default_baseline,
    random=True,
)
