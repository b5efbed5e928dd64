"""Rebuild the shipped example models in zoo/tiny-random (seeded; random weights, not trained).

    python experiments/make_tiny_random.py

They exist so `evomerge merge configs/example-*.yaml` runs on a fresh clone with no download.
The trained zoo, whose scores mean something, is built by a separate script.
"""

import shutil
from pathlib import Path

from evomerge.models.synthetic import make_family

ROOT = Path(__file__).resolve().parent.parent / "zoo" / "tiny-random"

if __name__ == "__main__":
    shutil.rmtree(ROOT, ignore_errors=True)
    for path in make_family(ROOT, "llama", finetunes=2, seed=2024, hidden=32, layers=2):
        print(path.relative_to(ROOT.parent.parent))
