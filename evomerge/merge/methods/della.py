"""DELLA (Deep et al., 2024), with TIES' sign election: MagPrune keeps each task-vector entry with a probability
from density - epsilon (smallest magnitude in its row) to density + epsilon (largest); survivors are
rescaled to the vector's L1 norm (mergekit's rescale). The draw is a counter hash keyed by the candidate's
seed, like DARE's. Fast path: none yet, the search runs the exact kernel (ranks per candidate)."""

from evomerge.merge.methods._gta import della_method

METHOD = della_method("della", consensus=True)
