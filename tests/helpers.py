"""Shared by the tests that run real searches: the smoke config, the CLI in a subprocess, the journal."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"


def cli(*args, cwd=REPO, timeout=600, env_extra=None):
    return subprocess.run(
        [sys.executable, "-m", "evomerge.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}, timeout=timeout,
    )  # fmt: skip


def smoke(tmp_path: Path, **changes) -> Path:
    """configs/smoke.yaml with sections updated (dotted keys), models as absolute paths."""
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["models"] = {
        "base": str(REPO / "zoo" / "base"),
        "sources": [str(REPO / "zoo" / n) for n in ("math-en", "lang-x")],
    }
    cfg["output"]["dir"] = str(tmp_path / "exp")
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / f"exp-{len(list(tmp_path.glob('exp-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def journal(exp: Path):
    """(candidates in (generation, idx) order, {final name: fitness})."""
    db = sqlite3.connect(exp / "experiment.sqlite")
    rows = db.execute(
        "SELECT generation, idx, genome, fitness, status FROM candidates ORDER BY generation, idx"
    ).fetchall()
    finals = dict(db.execute("SELECT name, fitness FROM finals").fetchall())
    db.close()
    return rows, finals


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
