"""DELLA (Deep et al., 2024), summed: MagPrune keeps each task-vector entry with a probability
from density - epsilon (smallest magnitude in its row) to density + epsilon (largest); survivors are
rescaled to the vector's L1 norm (mergekit's rescale). The draw is a counter hash keyed by the candidate's
seed, like DARE's. The search keeps each task vector's row ranks and L1 norm, and pays two passes
a candidate (the kept entries' L1 norms, then the merge)."""

from evomerge.merge.methods._gta import della_method

METHOD = della_method("della_linear", consensus=False)
