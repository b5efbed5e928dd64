"""Shared by the tests that run real searches: the smoke config, the CLI in a subprocess, the journal."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
PARETO = REPO / "configs" / "smoke-pareto.yaml"
# Where the tests merge and evaluate: cpu, or cuda on a GPU machine (EVOMERGE_TEST_DEVICE=cuda; conftest
# stops the run when that device is missing). Tests about a device's own rules name theirs explicitly.
DEVICE = os.environ.get("EVOMERGE_TEST_DEVICE", "cpu")


def cli(*args, cwd=REPO, timeout=600, env_extra=None):
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}, timeout=timeout,
    )  # fmt: skip


def minimal_config(**changes) -> dict:
    """The smallest experiment config the schema accepts (models and tasks unchecked), sections replaced."""
    cfg = {
        "models": {"base": "b", "sources": ["s1", "s2"]},
        "evaluation": {"tasks": [{"name": "zoo_math_x"}]},
        "output": {"dir": "x"},
    }
    cfg.update(changes)
    return cfg


def set_dotted(cfg: dict, changes: dict) -> dict:
    """Set config keys given as dotted paths ("optimizer.budget": 6), making sections as needed."""
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


def smoke(tmp_path: Path, **changes) -> Path:
    """configs/smoke.yaml with sections updated (dotted keys), models as absolute paths."""
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["models"] = {
        "base": str(REPO / "zoo" / "base"),
        "sources": [str(REPO / "zoo" / n) for n in ("math-en", "lang-x")],
    }
    cfg["output"]["dir"] = str(tmp_path / "exp")
    cfg.setdefault("runtime", {})["device"] = DEVICE
    set_dotted(cfg, changes)
    path = tmp_path / f"exp-{len(list(tmp_path.glob('exp-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pareto(tmp_path: Path, name: str = "exp", **changes) -> Path:
    """configs/smoke-pareto.yaml (two objectives, NSGA-II) on 8 search and 8 held-out items per task, its
    experiment in tmp_path / name, sections updated (dotted keys)."""
    cfg = yaml.safe_load(PARETO.read_text())
    cfg["models"] = {
        "base": str(REPO / "zoo" / "base"),
        "sources": [str(REPO / "zoo" / n) for n in ("math-en", "lang-x")],
    }
    cfg["output"]["dir"] = str(tmp_path / name)
    cfg["runtime"]["device"] = DEVICE
    for task in cfg["evaluation"]["tasks"]:
        task["limit"] = 8
    cfg["evaluation"]["split"]["heldout"] = 8
    set_dotted(cfg, changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


MULTI_OPTIMIZERS = {  # the multi-objective and archive optimizers on the pareto() config, rounds of 4
    "nsga2": {"name": "optuna", "sampler": "nsga2", "batch": 4},
    "m2n2": {"name": "m2n2", "batch": 4, "archive_size": 4},
    "map_elites": {"name": "map_elites", "batch": 4, "cells": 4},
}


FIDELITY_MODES = {  # cheap fitness on the smoke search (24 search items, rounds of 6)
    "subsample": {"subsample": {"items": 6}},
    "anchors": {"anchors": {"items": 6, "refresh": 1}},
    "racing": {"racing": {"items": 3}},
}


def journal(exp: Path):
    """(candidates in (generation, idx) order, {final name: fitness})."""
    db = sqlite3.connect(exp / "experiment.sqlite")
    rows = db.execute(
        "SELECT generation, idx, genome, fitness, status FROM candidates ORDER BY generation, idx"
    ).fetchall()
    finals = dict(db.execute("SELECT name, fitness FROM finals").fetchall())
    db.close()
    return rows, finals


def kill_and_resume(
    cfg: Path, out: Path, *, budget: int, seed: int, kills: int = 4, args: tuple = ()
) -> list[tuple[int, int]]:
    """Run `evomerge search cfg --out out [args]`, kill -9 it at random moments (during start-up, after a random
    number of journaled candidates plus a random fraction of the next, while scoring the finalists),
    resume each time, and run it to the end. Returns (candidates, finals) journaled at each kill."""
    rng = random.Random(seed)
    db = out / "experiment.sqlite"

    def progress():
        if not db.exists():
            return -1, 0
        con = sqlite3.connect(db)
        try:
            return tuple(
                con.execute(
                    "SELECT (SELECT COUNT(*) FROM candidates), (SELECT COUNT(*) FROM finals)"
                ).fetchone()
            )
        except sqlite3.OperationalError:
            return -1, 0
        finally:
            con.close()

    points = (
        [("time", rng.uniform(0.5, 3.0))]
        + [("count", n) for n in sorted(rng.sample(range(1, budget), kills))]
        + [("finals", 2)]
    )
    killed_at = []
    for kind, value in points + [("end", None)]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--out", str(out), *args], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        started = time.time()
        while proc.poll() is None and time.time() - started < 300:
            done, finals = progress()
            if (
                (kind == "time" and time.time() - started > value)
                or (kind == "count" and done >= value)
                or (kind == "finals" and finals >= value)
            ):
                time.sleep(rng.uniform(0.0, 0.2))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            killed_at.append(progress())
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()
    assert proc.returncode == 0
    return killed_at


def evolve(tmp_path: Path, name: str = "evolve", *, genome: dict | None = None, **top) -> Path:
    """A mergekit-evolve config on the zoo (TIES over math-en and lang-x, genes per 4 layers, mlp apart),
    scored on 8 items of zoo_math_x; `genome` and the top-level keys update it."""
    cfg = {
        "genome": {
            "models": [str(REPO / "zoo" / n) for n in ("math-en", "lang-x")], "merge_method": "ties",
            "base_model": str(REPO / "zoo" / "base"), "layer_granularity": 4, "filters": ["mlp"],
            **(genome or {}),
        },
        "tasks": [{"name": "zoo_math_x", "metric": "exact_match,strict-match"}],
        "limit": 8,
        "apply_chat_template": False,
        **top,
    }  # fmt: skip
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


FEWSHOT_TASK = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
training_split: train
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{answer}}}}"
target_delimiter: ""
num_fewshot: 3
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
{acc}metadata:
  version: 1.0
"""
_ACC = "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"


def fewshot_task(directory: Path, name: str, *, test_rows=(200, 260), acc=False, data=True) -> Path:
    """A local 3-shot log-likelihood task over the zoo's language-1 problems (train: the first 200,
    test: `test_rows`), written into `directory`; `data=False` leaves its data files missing."""
    directory.mkdir(parents=True, exist_ok=True)
    train, test = directory / f"{name}-train.jsonl", directory / f"{name}-test.jsonl"
    if data:
        lines = (REPO / "evomerge" / "tasks" / "zoo" / "zoo_math_en.jsonl").read_text().splitlines()
        train.write_text("\n".join(lines[:200]) + "\n")
        test.write_text("\n".join(lines[slice(*test_rows)]) + "\n")
    (directory / f"{name}.yaml").write_text(
        FEWSHOT_TASK.format(name=name, train=train, test=test, acc=_ACC if acc else "")
    )
    return directory
