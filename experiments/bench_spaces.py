"""The miniature of Sakana's table (best parent, default merges, PS, DFS alone, PS+DFS) on the zoo's
cross-skill target, for several optimizer seeds: every run a real `evomerge search` of
configs/demo-dfs.yaml (stages dfs, ps, ps-dfs; the same evaluation budget for each stage), with every
stage's optimizer seed set to the run's seed.

Prints, on the held-out split only (never seen by any search): zoo_math_x exact match of the best parent,
of the default merges (from the ps stage's finals), and of each stage's winner, mean ± sd over the seeds
with the per-seed values, each search row's gain over the best parent; then the candidates per minute of
each stage's search (candidates / time from its first evaluation to its last, re-scores included).

    python experiments/bench_spaces.py [--seeds 0 1 2] [--zoo zoo] [--out runs/bench-spaces] [--collect]

`--collect` prints the table of runs already made (it runs nothing); `--zoo DIR` runs on another zoo
(a directory with base, math-en, lang-x), as the zoo designs in docs/zoo.md were compared.
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
CONFIG = REPO / "configs" / "demo-dfs.yaml"
TARGET, METRIC = "zoo_math_x", "exact_match,strict-match"
STAGES = {"dfs": "DFS alone", "ps": "PS", "ps-dfs": "PS+DFS"}


def config_for(seed: int, zoo: Path, out: Path) -> dict:
    cfg = yaml.safe_load(CONFIG.read_text())

    def model(ref: str) -> str:
        return ref if ref == "previous" else str(zoo / Path(ref).name)

    cfg["models"]["base"] = model(cfg["models"]["base"])
    cfg["models"]["sources"] = [model(s) for s in cfg["models"]["sources"]]
    for stage in cfg["stages"]:
        stage["optimizer"]["seed"] = seed
        if "sources" in stage:
            stage["sources"] = [model(s) for s in stage["sources"]]
    cfg["name"] = f"bench-spaces-{seed}"
    cfg["output"]["dir"] = str(out / f"seed-{seed}")
    cfg["runtime"]["device"] = "cpu"
    return cfg


def run(seed: int, zoo: Path, out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"seed-{seed}.yaml"
    path.write_text(yaml.safe_dump(config_for(seed, zoo, out), sort_keys=False))
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(path)], cwd=REPO)
    if done.returncode:
        sys.exit(f"seed {seed}: evomerge search failed (exit {done.returncode})")
    return time.time() - started


def finals(stage_dir: Path) -> dict[str, float]:
    """Held-out target score of each final (evolved, parents, default merges) of one stage."""
    db = sqlite3.connect(stage_dir / "experiment.sqlite")
    rows = db.execute("SELECT name, metrics FROM finals WHERE status='ok'").fetchall()
    db.close()
    return {name: json.loads(metrics)[TARGET][METRIC] for name, metrics in rows}


def speed(stage_dir: Path) -> tuple[int, float]:
    """(candidates, candidates per minute of search time)."""
    db = sqlite3.connect(stage_dir / "experiment.sqlite")
    count, first, last = db.execute(
        "SELECT COUNT(*), MIN(started_at), MAX(finished_at) FROM candidates"
    ).fetchone()
    rescored = db.execute("SELECT MAX(finished_at) FROM scores").fetchone()[0]
    db.close()
    return count, count / (max(last, rescored or last) - first) * 60


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--zoo", type=Path, default=REPO / "zoo")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-spaces")
    parser.add_argument("--collect", action="store_true", help="print the table of runs already made")
    args = parser.parse_args()
    zoo, out = args.zoo.resolve(), args.out.resolve()
    walls = {}
    if not args.collect:
        for seed in args.seeds:
            walls[seed] = run(seed, zoo, out)
    rows: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    for seed in args.seeds:
        root = out / f"seed-{seed}"
        dfs, ps = finals(root / "dfs"), finals(root / "ps")
        parents = {k.removeprefix("parent "): v for k, v in {**dfs, **ps}.items() if k.startswith("parent ")}
        best = max(parents, key=parents.get)
        rows.setdefault(f"best parent ({best})", []).append(parents[best])
        for name, value in sorted(ps.items()):
            if name.startswith("default "):
                rows.setdefault(name.replace("default ", "default merge: "), []).append(value)
        for stage, label in STAGES.items():
            rows.setdefault(label, []).append(finals(root / stage)["evolved"])
            rates.setdefault(label, []).append(speed(root / stage)[1])
    parent = statistics.mean(next(v for k, v in rows.items() if k.startswith("best parent")))

    def spread(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    print(f"\n{TARGET} exact match, held-out (300 problems), {len(args.seeds)} seeds {args.seeds}; zoo {zoo}")
    print("| row | held-out EM (mean ± sd) | per seed | vs best parent |")
    print("|---|---:|---|---:|")
    for label, values in rows.items():
        gain = 100 * (statistics.mean(values) - parent)
        cells = ", ".join(f"{v:.3f}" for v in values)
        print(
            f"| {label} | {spread(values)} | {cells} | {'' if label.startswith('best') else f'{gain:+.1f}'} |"
        )
    ps, both = rows["PS"], rows["PS+DFS"]
    print(
        f"PS+DFS - PS per seed (points): {', '.join(f'{100 * (b - a):+.1f}' for a, b in zip(ps, both, strict=True))}"
    )
    print("\ncandidates per minute of search (2 CPU cores unless stated): "
          + ", ".join(f"{label} {statistics.mean(r):.0f}" for label, r in rates.items()))  # fmt: skip
    if walls:
        print("wall time per seed (three stages, finals, report): "
              + ", ".join(f"seed {s} {w / 60:.1f} min" for s, w in walls.items()))  # fmt: skip


if __name__ == "__main__":
    main()
