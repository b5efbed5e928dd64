"""DARE (Yu et al., 2023), summed: drop each task-vector entry with probability
1 - density (a counter-hash mask keyed by the candidate's seed) and rescale the survivors by 1/density."""

from evomerge.merge.methods._gta import dare_method

METHOD = dare_method("dare_linear", consensus=False)
