"""DARE (Yu et al., 2023), with TIES' sign election: drop each task-vector entry with probability
1 - density (a counter-hash mask keyed by the candidate's seed) and rescale the survivors by 1/density."""

from evomerge.merge import kernels
from evomerge.merge.methods._gta import default_baseline, fast_random, gta_params
from evomerge.merge.methods.base import MergeMethod, dare_keys

METHOD = MergeMethod(
    name="dare_ties",
    summary="random drop and rescale, sign election, in one pass",
    params=gta_params(normalize=False, rescale=True),
    exact=lambda name, base, models, p: kernels.dare_ties(
        base,
        models,
        p["weight"],
        p["density"],
        dare_keys(p.seed, name, len(models)),
        normalize=p["normalize"],
        rescale=p["rescale"],
        lam=p["lambda"],
    ),  # fmt: skip
    fast=fast_random(consensus=True),
    baseline=default_baseline,
    finals=3,
    random=True,
)
