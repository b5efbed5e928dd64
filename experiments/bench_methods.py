"""The merge methods beyond mergekit on the zoo (issue 27): each as a default merge and as the searched
method, against TIES and DARE-TIES, on held-out items only.

Every run is a real `evomerge search` of the PS problem of configs/demo-dfs.yaml (math-en and lang-x over
the base, genes per two layers, CMA-ES, 200 candidates, the same cheap fitness: 40 items a candidate,
the best re-scored in full) with `merge.method` set to the method; RegMean takes its Gram matrices from
64 items of zoo_math_x's search split. Printed, on the zoo_math_x held-out split (300 items no search
sees): the method's default merge (its finals' `default <method>`), the searched winner's mean ± sd over
the seeds with the per-seed values, and the best parent.

    python experiments/bench_methods.py [--seeds 0 1 2] [--methods ties dare_ties ...] [--budget 200] [--out DIR]
                                        [--collect]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TARGET, METRIC = "zoo_math_x", "exact_match,strict-match"
METHODS = ["ties", "dare_ties", "tsv_m", "iso_c", "iso_cts", "wudi", "regmean"]


def config(method: str, seed: int, out: Path, budget: int = 200) -> dict:
    zoo = REPO / "zoo"
    merge: dict = {"method": method}
    if method == "regmean":
        merge["calibration"] = {"task": TARGET, "items": 64}
    return {
        "name": f"bench-methods-{method}-{seed}",
        "models": {"base": str(zoo / "base"), "sources": [str(zoo / "math-en"), str(zoo / "lang-x")]},
        "merge": merge,
        "space": {"layers_per_group": 2},
        "optimizer": {"name": "cma", "budget": budget, "seed": seed},
        "evaluation": {
            "tasks": [
                {"name": TARGET, "metric": METRIC},
                {"name": "zoo_math_x_ll", "metric": "logprob,none", "weight": 0.01, "split_as": TARGET},
            ],
            "split": {"heldout": 300, "seed": 0},
            "batch_size": 100,
            "fidelity": {"subsample": {"items": 40}},
        },
        "runtime": {"device": "auto"},
        "output": {"dir": str(out / f"{method}-{seed}")},
    }


def heldout(exp: Path) -> dict[str, float]:
    db = sqlite3.connect(exp / "experiment.sqlite")
    rows = db.execute("SELECT name, metrics FROM finals WHERE status='ok'").fetchall()
    db.close()
    return {name: json.loads(m)[TARGET][METRIC] for name, m in rows}


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-methods")
    parser.add_argument("--collect", action="store_true", help="print the table of runs already made")
    args = parser.parse_args()
    if not args.collect:
        args.out.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for method in args.methods:
                path = args.out / f"{method}-{seed}.yaml"
                path.write_text(yaml.safe_dump(config(method, seed, args.out, args.budget), sort_keys=False))
                done = subprocess.run(
                    [sys.executable, "-m", "evomerge.cli", "search", str(path), "--fresh", "--force"],
                    cwd=REPO, stdout=subprocess.DEVNULL,
                )  # fmt: skip
                if done.returncode:
                    sys.exit(f"{method} seed {seed}: evomerge search failed (exit {done.returncode})")
    print(
        f"| method | default merge (held-out {TARGET}) | searched, {len(args.seeds)} seeds: mean ± sd (per seed) |"
    )
    print("|---|---:|---:|")
    parents = []
    for method in args.methods:
        runs = [heldout(args.out / f"{method}-{s}") for s in args.seeds]
        parents += [max(v for k, v in r.items() if k.startswith("parent ")) for r in runs]
        default = runs[0].get(f"default {method}", float("nan"))
        print(f"| {method} | {default:.3f} | {_ms([r['evolved'] for r in runs])} |")
    print(f"\nbest parent (math-en) on held-out {TARGET}: {max(parents):.3f}")


if __name__ == "__main__":
    main()
