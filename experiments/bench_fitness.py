"""Cheap fitness against full fitness on the demo problem (configs/demo-full.yaml): each fidelity mode at
two or three item counts, three optimizer seeds each, every run a real `evomerge search` process.

Per setting it prints the winner's held-out exact match (zoo_math_x on the 300 held-out problems, never
seen by the search: mean and spread over the seeds), the search's item-evaluations (candidates, anchor
evidence, re-scores; the held-out finals are the same in every mode and not counted), the wall time of
the whole command (start-up, search, re-scores, held-out finals, report), and the time of the search
itself (first evaluation to last re-score), each as a ratio to `full`.

    python experiments/bench_fitness.py [--seeds 0 1 2] [--only full subsample-20] [--out runs/bench-fitness]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evomerge.store import ExperimentStore, item_evaluations  # noqa: E402

SETTINGS: dict[str, object] = {
    "full": "full",
    "subsample-10": {"subsample": {"items": 10}},
    "subsample-20": {"subsample": {"items": 20}},
    "subsample-40": {"subsample": {"items": 40}},
    "anchors-10": {"anchors": {"items": 10}},
    "anchors-20": {"anchors": {"items": 20}},
    "anchors-40": {"anchors": {"items": 40}},
    "racing-20": {"racing": {"items": 20}},
    "racing-40": {"racing": {"items": 40}},
}
HELDOUT_METRIC = ("zoo_math_x", "exact_match,strict-match")


def run(setting: str, seed: int, out: Path) -> dict:
    config = yaml.safe_load((REPO / "configs" / "demo-full.yaml").read_text())
    config["models"] = {
        "base": str(REPO / "zoo" / "base"),
        "sources": [str(REPO / "zoo" / "math-en"), str(REPO / "zoo" / "lang-x")],
    }
    config["optimizer"]["seed"] = seed
    config["evaluation"]["fidelity"] = SETTINGS[setting]
    directory = out / f"{setting}-seed{seed}"
    path = out / f"{setting}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "search", str(path), "--out", str(directory), "--fresh", "--force"],
        check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.perf_counter() - started
    store = ExperimentStore.open(directory, readonly=True)
    try:
        evolved = next(f for f in store.finals() if f.kind == "evolved")
        task, metric = HELDOUT_METRIC
        return {
            "setting": setting,
            "seed": seed,
            "heldout_em": evolved.metrics[task][metric],
            "item_evals": item_evaluations(store.candidates(), store.scores()),
            "wall_s": wall,
            "search_s": search_seconds(directory),
        }
    finally:
        store.close()


def search_seconds(directory: Path) -> float:
    """From the first evaluation of the search split (anchor evidence included) to the last re-score."""
    store = ExperimentStore.open(directory, readonly=True)
    try:
        candidates, scores = store.candidates(), store.scores()
        start = min([c.started_at for c in candidates] + [s.finished_at - s.seconds for s in scores])
        end = max([c.finished_at for c in candidates] + [s.finished_at for s in scores])
        return end - start
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-fitness")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    done = {}
    if results_file.exists():  # a rerun keeps finished runs
        for line in results_file.read_text().splitlines():
            row = json.loads(line)
            if "search_s" not in row and (args.out / f"{row['setting']}-seed{row['seed']}").is_dir():
                row["search_s"] = search_seconds(args.out / f"{row['setting']}-seed{row['seed']}")
            done[(row["setting"], row["seed"])] = row
    # seed by seed, every setting in turn: on a shared machine whose speed drifts during the hour, each
    # setting then runs under the same conditions as full (the wall-time ratios are what is compared)
    for seed in args.seeds:
        for setting in args.only:
            if (setting, seed) in done:
                continue
            row = run(setting, seed, args.out)
            done[(setting, seed)] = row
            with results_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{setting} seed {seed}: held-out EM {row['heldout_em']:.4f}, "
                  f"{row['item_evals']} item-evals, {row['wall_s']:.0f} s", flush=True)  # fmt: skip
    table(done, args.only, args.seeds)


def table(done: dict, settings: list[str], seeds: list[int]) -> None:
    def stats(setting: str, key: str) -> list[float]:
        return [done[(setting, s)][key] for s in seeds if (setting, s) in done]

    full_items = statistics.mean(stats("full", "item_evals")) if stats("full", "item_evals") else None
    full_wall = statistics.mean(stats("full", "wall_s")) if stats("full", "wall_s") else None
    full_em = statistics.mean(stats("full", "heldout_em")) if stats("full", "heldout_em") else None
    full_search = statistics.mean(stats("full", "search_s")) if stats("full", "search_s") else None
    print()
    print(
        "| fitness | held-out EM (mean ± sd) | vs full | item-evals | fewer | wall (whole command) | less "
        "| search (loop + re-scores) | less |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for setting in settings:
        em, items, wall = stats(setting, "heldout_em"), stats(setting, "item_evals"), stats(setting, "wall_s")
        search = stats(setting, "search_s")
        if not em:
            continue
        mean, sd = statistics.mean(em), statistics.stdev(em) if len(em) > 1 else 0.0
        gap = f"{100 * (mean - full_em):+.1f} pts" if full_em is not None else ""
        fewer = f"{full_items / statistics.mean(items):.1f}x" if full_items else ""
        faster = f"{full_wall / statistics.mean(wall):.1f}x" if full_wall else ""
        quicker = f"{full_search / statistics.mean(search):.1f}x" if full_search and search else ""
        print(
            f"| {setting} | {mean:.3f} ± {sd:.3f} | {gap} | {statistics.mean(items):,.0f} | {fewer} "
            f"| {statistics.mean(wall):.0f} s | {faster} | {statistics.mean(search):.0f} s | {quicker} |"
        )


if __name__ == "__main__":
    main()
