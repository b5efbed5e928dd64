"""Search algorithms compared on the zoo at the same item-evaluation budget, several seeds.

Every run is a real `evomerge search` (full fitness: each candidate scored on every search item, so every
algorithm pays the same item-evaluations for the same number of candidates) of one problem: TIES over
math-en and lang-x (24 genes), two objectives — the target (zoo_math_x, word problems in language 2) and
math-en's own skill kept (zoo_math_en) — and, for the single-objective optimizers, their sum as the
fitness. The finals score each run's search front (and its winner) on held-out items no search sees.

Printed per algorithm, mean ± sd over the seeds, held-out only:
- target: the held-out zoo_math_x of the run's best on the target *as the search saw it* (the front member
  with the highest search-split zoo_math_x; never chosen on held-out);
- hypervolume of the held-out front in (target, retention) against the reference point (0, 0);
- item-evaluations the search paid for, and the wall time of the whole command.

    python experiments/bench_search.py [--seeds 0 1 2] [--budget 120] [--limit 100] [--only nsga2 m2n2]
                                       [--out runs/bench-search] [--collect]
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

TARGET, RETAIN, METRIC = "zoo_math_x", "zoo_math_en", "exact_match,strict-match"
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


def config(algorithm: str, seed: int, budget: int, limit: int, out: Path) -> dict:
    zoo = REPO / "zoo"
    return {
        "name": f"bench-search-{KEYS[algorithm]}-{seed}",
        "models": {"base": str(zoo / "base"), "sources": [str(zoo / "math-en"), str(zoo / "lang-x")]},
        "merge": {"method": "ties"},
        "space": {"layers_per_group": 2},
        "optimizer": {**ALGORITHMS[algorithm], "budget": budget, "seed": seed, "batch": 12}
        if ALGORITHMS[algorithm]["name"] != "cma"
        else {"name": "cma", "budget": budget, "seed": seed, "popsize": 12},
        "objectives": [{"task": TARGET}, {"task": RETAIN}],
        "evaluation": {
            "tasks": [{"name": t, "metric": METRIC, "limit": limit} for t in (TARGET, RETAIN)],
            "split": {"heldout": 300, "seed": 0},
            "batch_size": 100,
        },
        "runtime": {"device": "cpu"},
        "output": {"dir": str(out / f"{KEYS[algorithm]}-{seed}")},
    }


def run(algorithm: str, seed: int, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{KEYS[algorithm]}-{seed}.yaml"
    path.write_text(
        yaml.safe_dump(config(algorithm, seed, args.budget, args.limit, args.out), sort_keys=False)
    )
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "search", str(path), "--fresh", "--force"],
        cwd=REPO, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"{algorithm} seed {seed}: evomerge search failed (exit {done.returncode})")
    (args.out / f"{KEYS[algorithm]}-{seed}.wall").write_text(f"{time.time() - started:.1f}")


def measure(exp: Path) -> dict[str, float]:
    db = sqlite3.connect(exp / "experiment.sqlite")
    finals = db.execute(
        "SELECT candidate_id, metrics FROM finals WHERE kind='evolved' AND status='ok'"
    ).fetchall()
    search = dict(db.execute("SELECT id, metrics FROM candidates WHERE status='ok'").fetchall())
    items = db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
    db.close()
    held = {cid: json.loads(m) for cid, m in finals}
    points = [(m[TARGET][METRIC], m[RETAIN][METRIC]) for m in held.values()]
    front = [points[i] for i in pareto_front(points)]
    best = max(held, key=lambda cid: (json.loads(search[cid])[TARGET][METRIC], -cid))
    wall = exp.with_suffix(".wall")
    return {
        "target": held[best][TARGET][METRIC],
        "hypervolume": hypervolume(front, (0.0, 0.0)),
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--limit", type=int, default=100, help="search items per task (and held-out items)")
    parser.add_argument("--only", nargs="+", choices=list(KEYS.values()))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-search")
    parser.add_argument("--collect", action="store_true", help="print the table of runs already made")
    args = parser.parse_args()
    chosen = [a for a in ALGORITHMS if not args.only or KEYS[a] in args.only]
    if not args.collect:
        for seed in args.seeds:  # seed by seed: every algorithm sees the same machine load
            for algorithm in chosen:
                run(algorithm, seed, args)
    print(
        "| algorithm | held-out target of the best on target (mean ± sd) | held-out hypervolume (target, "
        "retention; ref 0, 0) | front size | item-evaluations | wall per run |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for algorithm in chosen:
        rows = [measure(args.out / f"{KEYS[algorithm]}-{s}") for s in args.seeds]
        evals = rows[0]["candidates"] * 2 * args.limit
        print(
            f"| {algorithm} | {_ms([r['target'] for r in rows])} | {_ms([r['hypervolume'] for r in rows])} | "
            f"{statistics.mean(r['front'] for r in rows):.1f} | {evals:,} | "
            f"{statistics.mean(r['wall'] for r in rows):.0f} s |"
        )


if __name__ == "__main__":
    main()
