"""`evomerge report` and `export` on real experiments made by the real `evomerge search` (the smoke config)."""

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, smoke
from helpers import cli as _cli


def _config(tmp_path: Path, name: str, **changes) -> Path:
    return smoke(tmp_path, name=name, **changes)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    done = _cli("search", _config(tmp, "<script>alert('x')</script> & co"))
    assert done.returncode == 0, done.stderr
    return tmp / "exp"


def test_report_files_and_content(finished):
    done = _cli("report", finished)
    assert done.returncode == 0, done.stderr
    for name in ("leaderboard.md", "report.html", "leaderboard.csv", "fitness.png", "recipe.png"):
        assert (finished / name).stat().st_size > 0, name
    md = (finished / "leaderboard.md").read_text()
    assert "gain over best parent" in md and "parent math-en" in md and "default dare_ties" in md
    assert "24 of 24" in md and "![fitness](fitness.png)" in md
    rows = list(csv.DictReader((finished / "leaderboard.csv").open()))
    db = sqlite3.connect(finished / "experiment.sqlite")
    count = db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
    best = db.execute("SELECT id, fitness FROM candidates ORDER BY fitness DESC, id LIMIT 1").fetchone()
    db.close()  # left open, its garbage collection deleted the -wal file under a later test's copytree
    assert len(rows) == count
    assert int(rows[0]["candidate"]) == best[0] and float(rows[0]["fitness"]) == pytest.approx(best[1])
    assert (finished / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out" in done.stdout and "evolved" in done.stdout


def test_html_is_self_contained_and_escaped(finished):
    _cli("report", finished)
    page = (finished / "report.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    assert "<script" not in page
    assert "http://" not in page and "https://" not in page  # no network: plots are data: URIs
    assert page.count("data:image/png;base64,") == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_renders_in_headless_chromium(finished, tmp_path):
    from PIL import Image

    _cli("report", finished)
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         f"--screenshot={shot}", "--window-size=1200,1600", (finished / "report.html").as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    image = Image.open(shot).convert("L")
    low, high = image.getextrema()
    assert high - low > 100  # text and plots on a white page, not a blank screen
    assert sum(image.histogram()[:128]) > 2000


def test_several_experiments_and_out_dir(finished, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished, other, ignore=shutil.ignore_patterns("*.png", "*.md", "*.html", "*.csv"))
    done = _cli("report", finished, other, "--out", tmp_path / "reports")
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "reports" / "other" / "leaderboard.md").read_text()
    assert "## All experiments" in md and md.count("<script>") == 0
    assert not (other / "report.html").exists()


@pytest.mark.slow
def test_report_while_search_runs_and_after_kill(tmp_path):
    cfg = _config(tmp_path, "live")
    exp = tmp_path / "exp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "search", str(cfg)], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    db = exp / "experiment.sqlite"
    deadline = time.time() + 120
    while time.time() < deadline:
        if db.exists() and sqlite3.connect(db).execute("SELECT COUNT(*) FROM candidates").fetchone()[0] >= 3:
            break
        time.sleep(0.1)
    live = _cli("report", exp, "--out", tmp_path / "live")
    assert live.returncode == 0, live.stderr
    assert "search split (unfinished)" in live.stdout
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _cli("report", exp)
    assert killed.returncode == 0, killed.stderr
    assert "(in progress or stopped)" in (exp / "leaderboard.md").read_text()
    resumed = _cli("search", cfg)  # the reports left the store intact: the run resumes and finishes
    assert resumed.returncode == 0, resumed.stderr
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 24


def test_bad_input(tmp_path, finished):
    done = _cli("report", tmp_path)
    assert done.returncode == 2 and "no experiment at" in done.stderr
    done = _cli("report", tmp_path / "missing")
    assert done.returncode == 2 and "not a directory" in done.stderr
    from evomerge.store import ExperimentStore

    (tmp_path / "empty").mkdir()
    ExperimentStore.create(tmp_path / "empty", {"config": "{}"}, config_text="").close()
    done = _cli("report", tmp_path / "empty")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: experiment {tmp_path / 'empty'} has no evaluations yet"
    ]


@pytest.fixture(scope="module")
def ties_experiment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ties")
    cfg = _config(tmp, "ties", merge={"method": "ties"}, space={"layers_per_group": 1, "split": True})
    data = yaml.safe_load(cfg.read_text())
    data["optimizer"]["budget"] = 8
    cfg.write_text(yaml.safe_dump(data))
    done = _cli("search", cfg)
    assert done.returncode == 0, done.stderr
    return tmp / "exp"


def _tensors(directory):
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_export_loads_and_mergekit_rebuilds_it(ties_experiment, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    out = tmp_path / "model"
    done = _cli("export", ties_experiment, out, "--rank", 2)
    assert done.returncode == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 8
    card = (out / "README.md").read_text()
    assert "rank 2" in card and "| layers.3.mlp |" in card
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    theirs = tmp_path / "mergekit"
    run_merge(
        MergeConfiguration.model_validate(config), str(theirs), MergeOptions(copy_tokenizer=True, quiet=True)
    )
    ours, ref = _tensors(out), _tensors(theirs)
    assert set(ours) == set(ref)
    assert max((ours[k] - ref[k]).abs().max().item() for k in ours) <= 1e-5
    again = tmp_path / "again"
    done = _cli("merge", out / "mergekit_config.yml", again)
    assert done.returncode == 0, done.stderr
    rebuilt = _tensors(again)
    assert all(torch.equal(ours[k], rebuilt[k]) for k in ours)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della"])
def test_registry_methods_search_and_export(tmp_path, method):
    """A method added through the registry is searchable with its own genes (breadcrumbs: gamma; DELLA:
    epsilon, kept valid against density), scored in the finals beside the standard defaults, and exported
    as a mergekit config that mergekit rebuilds within 1e-5 when the method is deterministic; methods with
    nothing to search (model_stock, karcher) join the finals through merge.baselines."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    extra = "gamma" if method.startswith("breadcrumbs") else "epsilon"
    extra_baselines = ["model_stock", "karcher"] if method == "breadcrumbs_ties" else []
    cfg = _config(tmp_path, method, merge={"method": method, "baselines": extra_baselines},
                  space={"layers_per_group": 2, extra: {"min": 0.01, "max": 0.05}})  # fmt: skip
    data = yaml.safe_load(cfg.read_text())
    data["optimizer"]["budget"] = 4
    data["optimizer"]["popsize"] = 4  # a round within the budget
    cfg.write_text(yaml.safe_dump(data))
    done = _cli("search", cfg)
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    recipe = json.loads(db.execute("SELECT recipe FROM candidates WHERE status='ok' LIMIT 1").fetchone()[0])
    values = recipe["groups"]["layers.0"]
    assert recipe["method"] == method and 0.01 <= min(values[extra]) <= max(values[extra]) <= 0.05
    finals = {row[0] for row in db.execute("SELECT name FROM finals")}
    expected = {f"default {m}" for m in [method, "ties", "dare_ties", "task_arithmetic", *extra_baselines]}
    assert expected <= finals
    out = tmp_path / "model"
    done = _cli("export", tmp_path / "exp", out)
    assert done.returncode == 0, done.stderr
    assert f"{extra}" in (out / "README.md").read_text()
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert config["merge_method"] == method
    if method == "della":
        assert "seeds its masks from the candidate" in (out / "mergekit_config.yml").read_text()
        return
    theirs = tmp_path / "mergekit"
    run_merge(
        MergeConfiguration.model_validate(config), str(theirs), MergeOptions(copy_tokenizer=True, quiet=True)
    )
    ours, ref = _tensors(out), _tensors(theirs)
    assert max((ours[k] - ref[k]).abs().max().item() for k in ours) <= 1e-5


def test_export_dare_is_the_searched_candidate(finished, tmp_path):
    """A DARE export has the candidate's own masks: scoring it gives the journaled search fitness."""
    out = tmp_path / "dare"
    done = _cli("export", finished, out)
    assert done.returncode == 0, done.stderr
    assert "seeds its masks from the candidate" in (out / "mergekit_config.yml").read_text()
    scored = _cli(
        "eval", out, "--task", "zoo_math_x", "--split", "search", "--heldout", 300, "--limit", 24, "--json"
    )
    assert scored.returncode == 0, scored.stderr
    db = sqlite3.connect(finished / "experiment.sqlite")
    fitness = db.execute(
        "SELECT fitness FROM candidates WHERE status='ok' ORDER BY fitness DESC, id LIMIT 1"
    ).fetchone()[0]
    assert json.loads(scored.stdout)["metrics"]["zoo_math_x"]["exact_match,strict-match"] == pytest.approx(
        fitness
    )


def test_export_bad_input(finished, tmp_path):
    done = _cli("export", finished, tmp_path / "x", "--rank", 999)
    assert done.returncode == 2 and "--rank 999" in done.stderr and not (tmp_path / "x").exists()
    done = _cli("export", tmp_path, tmp_path / "y")
    assert done.returncode == 2 and "no experiment at" in done.stderr


def test_per_item_results_are_journaled_and_paired_in_the_report(finished):
    """Every evaluation stores which items it scored and each item's value (packed arrays); the report
    pairs the winner with the best parent and the best default merge on the held-out items."""
    import numpy as np

    from evomerge.store import ExperimentStore

    assert _cli("report", finished).returncode == 0
    store = ExperimentStore.open(finished, readonly=True)
    try:
        candidates, finals = store.candidates(), store.finals()
        for c in candidates:
            items = store.items(f"candidate:{c.id}")
            assert set(items) == {"zoo_math_x"}
            got = items["zoo_math_x"]
            assert got.metric == "exact_match,strict-match" and len(got.ids) == 24
            assert got.values.mean() == pytest.approx(c.metrics["zoo_math_x"]["exact_match,strict-match"])
        held = {f.name: store.items(f"final:{f.name}")["zoo_math_x"] for f in finals}
    finally:
        store.close()
    ids = {tuple(v.ids) for v in held.values()}
    assert len(ids) == 1  # every final scored the same held-out items
    assert not set(next(iter(ids))) & set(items["zoo_math_x"].ids.tolist())  # held-out never searched
    evolved, parent = held["evolved"], held["parent math-en"]
    diff = evolved.values - parent.values
    md = (finished / "leaderboard.md").read_text()
    assert (
        "item by item" in md
        and f"| evolved vs parent math-en | zoo_math_x | 24 | {int((diff > 0).sum())} right |" in md
    )
    assert f"{diff.mean():+.4f}" in md
    assert np.isin(evolved.values, [0.0, 1.0]).all()
