"""Scheduling benchmark of the Ray executor: worker utilisation and throughput with simulated evaluations.

The search loop, the schedule, the Ray executor and the SQLite journal are the real ones; only the
worker is simulated: it sleeps for a random duration (log-normal, seeded by the candidate's place in the
run, so every configuration sees the same durations) and returns a fitness computed from the recipe. It
compares, on the demo's search space (16 genes, CMA-ES rounds of 12):

  * 1 worker, and N workers with the default overlap (half a round asked ahead of each tell);
  * N workers with overlap 0: one generation in flight at a time, the synchronous generation pool of
    mergekit-evolve, whose workers wait at every generation barrier for the slowest candidate.

    python experiments/bench_ray.py [--workers 4] [--budget 144] [--mean 0.25] [--sigma 0.6]

Targets: utilisation >= 90% with N workers, throughput >= 0.8 N x that of one worker. Rounds should hold
at least 3 candidates per worker: a round's slowest candidates hold up its tell, and half a round asked
ahead covers about that wait (with 8 workers use --popsize 24).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from evomerge.config import load_config
from evomerge.experiment import open_experiment, search_inputs
from evomerge.runtime.jobs import Outcome
from evomerge.search.run import Search

REPO = Path(__file__).resolve().parent.parent


class SimulatedWorker:
    """Sleeps as long as an evaluation would take; scores a recipe by its distance to a fixed point."""

    def __init__(self, mean: float, sigma: float) -> None:
        self.mean, self.sigma = mean, sigma

    def run(self, job) -> Outcome:
        digest = hashlib.blake2b(repr(job.key).encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        seconds = self.mean * math.exp(self.sigma * rng.standard_normal() - self.sigma**2 / 2)
        time.sleep(seconds)
        values = [
            v for group in job.recipe["groups"].values() for p in group.values() for v in np.ravel(p)
        ]  # fmt: skip
        fitness = -float(np.sum((np.asarray(values, dtype=float) - 0.7) ** 2))
        return Outcome(True, fitness, {"sim": fitness}, eval_seconds=seconds)


def run(
    workers: int, overlap: int | None, budget: int, mean: float, sigma: float, popsize: int | None
) -> dict:
    config, config_dir = load_config(REPO / "configs" / "demo.yaml")
    data = config.model_dump(mode="json")
    data["optimizer"].update(budget=budget, overlap=overlap, popsize=popsize)
    data["runtime"].update(executor="ray", device="cpu", ray={"workers": workers, "cpus_per_worker": 1})
    config = type(config).model_validate(data)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "exp"
        out.mkdir()
        store, _, _ = open_experiment(config, "", out, config_dir=config_dir)
        inputs = search_inputs(config, config_dir)
        search = Search(config, config_dir, store, inputs, worker_factory=lambda: SimulatedWorker(mean, sigma))
        try:
            search.run()
            usage = search.executor.usage
            best = store.best().fitness
        finally:
            search.close()
            store.close()
    return {
        "wall": usage.wall_seconds,
        "throughput": usage.jobs / usage.wall_seconds,
        "utilisation": usage.utilisation,
        "best": best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--budget", type=int, default=144, help="evaluations per configuration")
    parser.add_argument("--mean", type=float, default=0.25, help="mean simulated evaluation, seconds")
    parser.add_argument("--sigma", type=float, default=0.6, help="log-normal spread of the durations")
    parser.add_argument(
        "--popsize", type=int, default=None, help="CMA-ES round size (default 12 for 16 genes)"
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    # logical CPUs: the simulated workers sleep, so N of them fit on any machine
    ray.init(num_cpus=max(args.workers, 1), include_dashboard=False, log_to_driver=False)
    n = args.workers
    rows = [
        ("1 worker, overlap 1/2 round", run(1, None, args.budget, args.mean, args.sigma, args.popsize)),
        (f"{n} workers, overlap 1/2 round", run(n, None, args.budget, args.mean, args.sigma, args.popsize)),
        (f"{n} workers, overlap 0 (sync pool)", run(n, 0, args.budget, args.mean, args.sigma, args.popsize)),
    ]
    ray.shutdown()
    one = rows[0][1]["throughput"]
    print(
        f"{args.budget} simulated evaluations each, log-normal durations (mean {args.mean}s, sigma {args.sigma}), "
        f"rounds of {args.popsize or 12}"
    )
    print(f"{'configuration':36} {'wall s':>7} {'evals/s':>8} {'speed-up':>9} {'utilisation':>12}")
    for name, r in rows:
        print(
            f"{name:36} {r['wall']:7.1f} {r['throughput']:8.2f} {r['throughput'] / one:8.2f}x "
            f"{100 * r['utilisation']:11.1f}%"
        )
    ours, sync = rows[1][1], rows[2][1]
    print(
        f"targets: utilisation {100 * ours['utilisation']:.1f}% (>= 90%), speed-up {ours['throughput'] / one:.2f}x "
        f"(>= {0.8 * n:.1f}x); against the sync pool: {ours['throughput'] / sync['throughput']:.2f}x throughput"
    )


if __name__ == "__main__":
    main()
