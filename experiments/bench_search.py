"""Search algorithms compared on the zoo at the same item-evaluation budget, several seeds.

Every run is a real `evomerge search` (full fitness: each candidate scored on every search item, so every
algorithm pays the same item-evaluations for the same number of candidates) of one of two problems, each
TIES with two objectives and, for the single-objective optimizers, their sum as the fitness:
- `retention`: math-en and lang-x (24 genes); the target (zoo_math_x, word problems in language 2) and
  math-en's own skill kept (zoo_math_en). On this zoo the two barely conflict.
- `compare`: math-en, lang-x and compare-en (36 genes); the target and compare-en's skill (zoo_compare_en,
  "who has more", two choices: chance is 0.5). These conflict: the default merges reach 0.87 on
  compare_en and 0.00 on the target, math-en 0.33 on the target and 0.48 on compare_en.
The finals score each run's search front (and its winner) on held-out items no search sees.

Printed per algorithm, mean ± sd over the seeds, held-out only:
- target: the held-out zoo_math_x of the run's best on the target *as the search saw it* (the front member
  with the highest search-split zoo_math_x; never chosen on held-out);
- hypervolume of the held-out front in (target, second objective) against the reference point (0, 0)
  (chance on compare_en is 0.5, but a reference there would give a target-only model no volume);
- item-evaluations the search paid for, and the wall time of the whole command.

    python experiments/bench_search.py [--problem retention|compare] [--seeds 0 1 2] [--budget 120]
                                       [--limit 100] [--only nsga2 m2n2] [--out DIR] [--collect]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evomerge.search.objectives import hypervolume, pareto_front  # noqa: E402

TARGET = "zoo_math_x"
PROBLEMS = {  # second objective (task, metric), sources, hypervolume reference point
    "retention": (("zoo_math_en", "exact_match,strict-match"), ("math-en", "lang-x"), (0.0, 0.0)),
    "compare": (("zoo_compare_en", "acc,none"), ("math-en", "lang-x", "compare-en"), (0.0, 0.0)),
}
METRIC = "exact_match,strict-match"
ALGORITHMS = {
    "cma (weighted sum)": {"name": "cma"},
    "random": {"name": "random"},
    "nsga2": {"name": "optuna", "sampler": "nsga2"},
    "m2n2": {"name": "m2n2"},
    "map_elites": {"name": "map_elites", "cells": 10},
}
KEYS = {
    "cma (weighted sum)": "cma",
    "random": "random",
    "nsga2": "nsga2",
    "m2n2": "m2n2",
    "map_elites": "map_elites",
}


def config(algorithm: str, seed: int, args, out: Path) -> dict:
    zoo = REPO / "zoo"
    (second, second_metric), sources, _ = PROBLEMS[args.problem]
    spec = ALGORITHMS[algorithm]
    size = {"popsize": 12} if spec["name"] == "cma" else {"batch": 12}
    return {
        "name": f"bench-search-{args.problem}-{KEYS[algorithm]}-{seed}",
        "models": {"base": str(zoo / "base"), "sources": [str(zoo / s) for s in sources]},
        "merge": {"method": "ties"},
        "space": {"layers_per_group": 2},
        "optimizer": {**spec, "budget": args.budget, "seed": seed, **size},
        "objectives": [{"task": TARGET}, {"task": second}],
        "evaluation": {
            "tasks": [
                {"name": TARGET, "metric": METRIC, "limit": args.limit},
                {"name": second, "metric": second_metric, "limit": args.limit},
            ],
            "split": {"heldout": 300, "seed": 0},
            "batch_size": 100,
        },
        "runtime": {"device": "cpu"},
        "output": {"dir": str(out / f"{KEYS[algorithm]}-{seed}")},
    }


def run(algorithm: str, seed: int, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{KEYS[algorithm]}-{seed}.yaml"
    path.write_text(yaml.safe_dump(config(algorithm, seed, args, args.out), sort_keys=False))
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "search", str(path), "--fresh", "--force"],
        cwd=REPO, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"{algorithm} seed {seed}: evomerge search failed (exit {done.returncode})")
    (args.out / f"{KEYS[algorithm]}-{seed}.wall").write_text(f"{time.time() - started:.1f}")


def measure(exp: Path, problem: str) -> dict[str, float]:
    (second, second_metric), _, reference = PROBLEMS[problem]
    db = sqlite3.connect(exp / "experiment.sqlite")
    finals = db.execute(
        "SELECT candidate_id, metrics FROM finals WHERE kind='evolved' AND status='ok'"
    ).fetchall()
    search = dict(db.execute("SELECT id, metrics FROM candidates WHERE status='ok'").fetchall())
    places = {i: (g, x) for i, g, x in db.execute("SELECT id, generation, idx FROM candidates")}
    items = db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
    db.close()
    held = {cid: json.loads(m) for cid, m in finals}
    points = [(m[TARGET][METRIC], m[second][second_metric]) for m in held.values()]
    front = [points[i] for i in pareto_front(points)]
    best = min(held, key=lambda cid: (-json.loads(search[cid])[TARGET][METRIC], places[cid]))
    wall = exp.with_suffix(".wall")
    return {
        "target": held[best][TARGET][METRIC],
        "hypervolume": hypervolume(front, reference),
        "candidates": items,
        "wall": float(wall.read_text()) if wall.exists() else float("nan"),
        "front": len(front),
    }


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problem", choices=list(PROBLEMS), default="retention")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--limit", type=int, default=100, help="search items per task (and held-out items)")
    parser.add_argument("--only", nargs="+", choices=list(KEYS.values()))
    parser.add_argument(
        "--out", type=Path, help="default runs/bench-search (retention), runs/bench-search-compare"
    )
    parser.add_argument("--collect", action="store_true", help="print the table of runs already made")
    args = parser.parse_args()
    if args.out is None:
        args.out = REPO / "runs" / ("bench-search" if args.problem == "retention" else "bench-search-compare")
    second, _, reference = PROBLEMS[args.problem]
    chosen = [a for a in ALGORITHMS if not args.only or KEYS[a] in args.only]
    if not args.collect:
        for seed in args.seeds:  # seed by seed: every algorithm sees the same machine load
            for algorithm in chosen:
                run(algorithm, seed, args)
    print(
        f"| algorithm | held-out target of the best on target (mean ± sd) | held-out hypervolume (target, "
        f"{second[0]}; ref {reference[0]:g}, {reference[1]:g}) | front size | item-evaluations | wall per run |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for algorithm in chosen:
        rows = [measure(args.out / f"{KEYS[algorithm]}-{s}", args.problem) for s in args.seeds]
        evals = rows[0]["candidates"] * 2 * args.limit
        print(
            f"| {algorithm} | {_ms([r['target'] for r in rows])} | {_ms([r['hypervolume'] for r in rows])} | "
            f"{statistics.mean(r['front'] for r in rows):.1f} | {evals:,} | "
            f"{statistics.mean(r['wall'] for r in rows):.0f} s |"
        )


if __name__ == "__main__":
    main()
