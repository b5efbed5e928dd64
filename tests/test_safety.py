"""An experiment directory is data, --force deletes only what evomerge made, one writer per experiment,
safe writes, reproducible few-shot fitness, every bad config one line before anything exists, literal
terminal output, and the smaller items of the same review (issue 12). Real CLI, real files, real lm-eval."""

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DEVICE, REPO, cli, fewshot_task, journal, smoke

from evomerge.errors import UserError

ZOO = REPO / "zoo"


@pytest.fixture
def tiny(finished_smoke):
    """A finished one-round smoke experiment (6 evaluations + finals): copied by the tests that change it."""
    return finished_smoke


def _copy(exp: Path, dest: Path) -> Path:
    shutil.copytree(exp, dest, symlinks=True)
    return dest


def _tree(path: Path) -> dict:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".evomerge.lock"  # the lock file records its last holder
    }


# -- deletes only its own --------------------------------------------------------------------------------


def test_fresh_force_on_staged_config_keeps_unrelated_files(tmp_path):
    data = yaml.safe_load((REPO / "configs" / "smoke-stages.yaml").read_text())
    victim = tmp_path / "mine"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")  # files only: no stage-like directory at all
    data["output"]["dir"] = str(victim)
    cfg = tmp_path / "staged.yaml"
    cfg.write_text(yaml.safe_dump(data))
    done = cli("search", cfg, "--fresh", "--force", cwd=REPO / "configs")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert (victim / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]  # nothing created either


@pytest.mark.slow
def test_fresh_force_refuses_unmarked_and_cwd(tiny, tmp_path):
    cfg, exp = tiny
    old = _copy(exp, tmp_path / "old")
    (old / ".evomerge").unlink()  # an experiment evomerge did not mark (an older version, or not ours)
    done = cli("search", cfg, "--out", old, "--fresh", "--force")
    assert done.returncode == 2 and "refusing to delete" in done.stderr
    assert (old / "experiment.sqlite").is_file()
    here = _copy(exp, tmp_path / "here")
    done = cli("search", cfg, "--out", ".", "--fresh", "--force", cwd=here)
    assert done.returncode == 2 and "refusing to delete '.'" in done.stderr
    done = cli("search", cfg, "--out", here, "--fresh", "--force", cwd=here / "..")
    assert done.returncode == 0, done.stderr  # named explicitly from outside, a marked experiment may go
    done = cli("search", cfg, "--out", here, "--fresh", "--force", cwd=here)
    assert done.returncode == 2 and "working directory" in done.stderr
    assert (here / "experiment.sqlite").is_file()


def test_export_never_deletes_the_experiment_or_unmarked_dirs(tiny, tmp_path):
    _, exp = tiny
    mine = _copy(exp, tmp_path / "e")
    before = _tree(mine)
    for target in (".", ".."):
        done = cli("export", ".", target, "--force", cwd=mine)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert _tree(mine) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    done = cli("export", mine, other, "--force")
    assert done.returncode == 2 and "not created by evomerge" in done.stderr
    assert (other / "keep.txt").read_text() == "keep"
    # a model evomerge exported is marked, so --force may replace it
    model = tmp_path / "model"
    assert cli("export", mine, model).returncode == 0
    assert json.loads((model / ".evomerge").read_text())["kind"] == "model"
    again = cli("export", mine, model, "--rank", 2, "--force")
    assert again.returncode == 0, again.stderr
    mode = stat.S_IMODE(model.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's 0700
    assert stat.S_IMODE((model / "config.json").stat().st_mode) == 0o666 & ~umask


def test_merge_force_refuses_a_directory_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.bin").write_bytes(b"x")
    cfg = REPO / "configs" / "example-ties.yaml"
    done = cli("merge", cfg, out, "--force")
    assert done.returncode == 2 and "not created by evomerge" in done.stderr
    assert (out / "data.bin").read_bytes() == b"x"


# -- one writer -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_search_on_a_running_experiment_exits_at_once(tmp_path):
    cfg = smoke(tmp_path, **{"optimizer.budget": 60})
    exp = tmp_path / "exp"
    first = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "search", str(cfg)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (exp / "experiment.sqlite").exists() and journal(exp)[0]:
                break
            time.sleep(0.5)
        assert (exp / "experiment.sqlite").exists()
        started = time.perf_counter()
        second = cli("search", cfg)
        waited = time.perf_counter() - started
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid} on " in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert waited < 15  # it does not check models and tasks first: the lock comes before anything
        fresh = cli("search", cfg, "--fresh", "--force")
        assert fresh.returncode == 2 and "in use" in fresh.stderr
        assert (exp / "experiment.sqlite").exists()
        assert cli("report", exp).returncode == 0  # readers never need the lock
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    rows, _ = journal(exp)
    assert len(rows) == len({(g, i) for g, i, *_ in rows})  # one writer: no duplicates


# -- safe writes ------------------------------------------------------------------------------------------


def test_planted_symlinks_are_never_followed(tiny, tmp_path):
    cfg, exp = tiny
    mine = _copy(exp, tmp_path / "e")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("leaderboard.md", "report.html", "leaderboard.csv", "fitness.png", ".leaderboard.md.tmp"):
        target = mine / name
        target.unlink(missing_ok=True)
        target.symlink_to(victim)
    done = cli("report", mine)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"
    assert (
        not (mine / "leaderboard.md").is_symlink()
        and "evomerge report" in (mine / "leaderboard.md").read_text()
    )
    # the run log of a resumed experiment
    (mine / "search.log").unlink()
    (mine / "search.log").symlink_to(victim)
    done = cli("search", cfg, "--out", mine, "--budget", 7)
    assert done.returncode == 2 and "symbolic link" in done.stderr
    assert victim.read_text() == "precious"


def test_names_from_configs_stay_on_one_line(tmp_path):
    cfg = smoke(tmp_path, name="evil\nname\r|x", optimizer={"name": "random", "budget": 2, "batch": 2})
    done = cli("search", cfg)
    assert done.returncode == 0, done.stderr
    exp = tmp_path / "exp"
    assert cli("report", exp).returncode == 0
    md = (exp / "leaderboard.md").read_text()
    assert "# evomerge report: evil name |x\n" in md and "| experiment | evil name \\|x |" in md
    html = (exp / "report.html").read_text()
    assert "evil\nname" not in html and "evil name" in html


# -- reproducible fitness -------------------------------------------------------------------------------


def _fewshot_task(tmp_path: Path) -> Path:
    return fewshot_task(tmp_path / "tasks", "fewshot_ppl")


@pytest.mark.slow
def test_fewshot_fitness_is_a_function_of_model_and_config(tmp_path):
    from evomerge.evaluate.run import evaluate_model

    tasks = _fewshot_task(tmp_path)
    runs = []
    for _ in range(2):  # two processes
        done = cli(
            "eval", ZOO / "math-en", "--task", "fewshot_ppl", "--include-path", tasks, "--json",
            "--device", DEVICE, "--split-seed", 3,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout)["metrics"])
    assert runs[0] == runs[1]
    # two successive calls in one process, and a different split seed gives other shots
    from evomerge.evaluate.evaluator import Evaluator
    from evomerge.evaluate.run import load_model_and_tokenizer
    from evomerge.evaluate.spec import EvaluationSpec

    model, tok = load_model_and_tokenizer(str(ZOO / "math-en"), device=DEVICE, dtype="float32")
    spec = EvaluationSpec.model_validate(
        {
            "tasks": [{"name": "fewshot_ppl"}],
            "include_paths": [str(tasks)],
            "split": {"heldout": 0.5, "seed": 3},
        }
    )
    evaluator = Evaluator(model, tok, spec)
    first, second = evaluator.evaluate().metrics, evaluator.evaluate().metrics
    assert first == second == runs[0]
    other = evaluate_model(
        str(ZOO / "math-en"), ["fewshot_ppl"], include_paths=[str(tasks)], split_seed=4, device=DEVICE
    )
    assert other.metrics != first  # the shots (and the split) are the config's, and they matter


# -- every bad config is one line, before anything is created ----------------------------------------------


def _bad_task_dir(tmp_path: Path) -> Path:
    return fewshot_task(tmp_path / "badtasks", "ghost", data=False)


BAD = [
    ({"evaluation.tasks": [{"name": "zoo_math_x", "weight": float("nan")}]}, "weight"),
    ({"evaluation.tasks": [{"name": "zoo_math_x", "weight": float("inf")}]}, "weight"),
    ({"evaluation.split": {"heldout": float("nan")}}, "heldout"),
    ({"evaluation.split": {"heldout": 600}}, "leaves no search"),
    ({"evaluation.split": {"heldout": 0}}, "heldout"),
    ({"optimizer.seed": 2**32}, "optimizer.seed"),
    ({"optimizer": {"name": "nevergrad", "optimizer": "TwoPointDE", "budget": 6}}, "did you mean"),
    ({"evaluation.tasks": [{"name": "zoo_math_x"}, {"name": "zoo_math_x"}]}, "listed twice"),
    ({"evaluation.tasks": [{"name": "zoo_math_x", "metric": "exact_match,nope"}]}, "not a metric"),
    ({"evaluation.tasks": [{"name": "zoo_verbs_x", "metric": "exact_match,strict-match"}]}, "acc,none"),
    ({"runtime.device": "gpu"}, "runtime.device"),
    ({"evaluation.tasks": [{"name": "zoo_math_x", "split_as": "zoo_nope"}]}, "split_as"),
    ({"runtime.executor": "ray", "runtime.ray": {"cpus_per_worker": float("inf")}}, "cpus_per_worker"),
    ({"models.sources": [str(ZOO / "base"), str(ZOO / "lang-x")]}, "is also listed in sources"),
    ({"models.sources": [str(ZOO / "base") + "/", str(ZOO / "lang-x")]}, "is the base model"),
    ({"models.sources": [str(ZOO / "math-en"), str(ZOO / "math-en") + "/"]}, "same model"),
    ({"optimizer.overlap": 99}, "overlap"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("command", ["validate", "search"])
def test_bad_config_is_one_line_and_creates_nothing(tmp_path, command, changes, message):
    cfg = smoke(tmp_path, **changes)
    done = cli(command, cfg)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not (tmp_path / "exp").exists()


@pytest.mark.slow
def test_missing_task_data_duplicate_keys_and_eval_options(tmp_path):
    cfg = smoke(tmp_path, **{"evaluation.include_paths": [str(_bad_task_dir(tmp_path))]})
    data = yaml.safe_load(cfg.read_text())
    data["evaluation"]["tasks"] = [{"name": "ghost"}]
    cfg.write_text(yaml.safe_dump(data))
    for command in ("validate", "search"):
        done = cli(command, cfg)
        assert (
            done.returncode == 2 and "cannot load ghost" in done.stderr and len(done.stderr.splitlines()) == 1
        )
    assert not (tmp_path / "exp").exists()
    dup = tmp_path / "dup.yaml"
    dup.write_text(cfg.read_text() + "runtime:\n  device: cpu\n")  # a second top-level `runtime`
    done = cli("validate", dup)
    assert done.returncode == 2 and "duplicate key 'runtime'" in done.stderr
    merge_dup = tmp_path / "merge.yaml"
    merge_dup.write_text((REPO / "configs" / "example-ties.yaml").read_text() + "\nmerge_method: linear\n")
    done = cli("merge", merge_dup, tmp_path / "m")
    assert done.returncode == 2 and "duplicate key 'merge_method'" in done.stderr
    for option in ("--limit", "--batch-size"):
        done = cli("eval", ZOO / "math-en", "--task", "zoo_math_x", option, 0)
        assert done.returncode == 2 and f"{option} must be at least 1" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_non_finite_fitness_is_a_failed_candidate():
    from evomerge.runtime.jobs import Outcome
    from evomerge.search.run import _finite

    for value in (float("nan"), float("inf"), float("-inf")):
        out = _finite(Outcome(True, value, {"t": {"m": 1.0}}))
        assert not out.ok and out.fitness == float("-inf") and "non-finite" in out.reason
    assert _finite(Outcome(True, 0.5)).ok


def test_overflowing_fitness_fails_the_candidate():
    from evomerge.evaluate.evaluator import Evaluator
    from evomerge.evaluate.run import load_model_and_tokenizer
    from evomerge.evaluate.spec import EvaluationSpec

    model, tok = load_model_and_tokenizer(str(ZOO / "math-en"), device=DEVICE, dtype="float32")
    spec = EvaluationSpec.model_validate(
        {
            "tasks": [
                {"name": "zoo_math_x_ll", "weight": -1e308, "limit": 4},
                {"name": "zoo_verbs_x", "weight": -1e308, "limit": 4},
            ],
            "split": {"heldout": 0.5},
        }
    )
    result = Evaluator(model, tok, spec).evaluate()
    assert not result.ok and "fitness is" in result.error


# -- terminal output ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_markup_in_names_and_reasons_is_printed_literally(tmp_path):
    odd = tmp_path / "math[dpo]"
    shutil.copytree(ZOO / "math-en", odd)
    cfg = smoke(
        tmp_path,
        **{
            "models.sources": [str(odd), str(ZOO / "lang-x")],
            "optimizer": {"name": "random", "budget": 2, "batch": 2},
        },
    )
    done = cli("search", cfg)
    assert done.returncode == 0, done.stderr
    assert "parent math[dpo]" in done.stdout.replace("\n", "")
    exp = tmp_path / "exp"
    db = sqlite3.connect(exp / "experiment.sqlite")
    with db:
        db.execute(
            "UPDATE finals SET status='failed', reason='[/data/x] disk [bold]gone' WHERE kind='default'"
        )
    db.close()
    done = cli("report", exp, env_extra={"COLUMNS": "400"})
    assert done.returncode == 0, done.stderr
    assert "failed: [/data/x] disk [bold]gone" in done.stdout


# -- smaller items ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", ["equal", "different"])
def test_tied_embeddings_export_is_the_model_that_was_scored(tmp_path, stored):
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import MergeEngine
    from evomerge.merge.methods import Method
    from evomerge.merge.recipe import Recipe
    from evomerge.models.checkpoint import Checkpoint
    from evomerge.models.loading import load_target
    from evomerge.models.synthetic import make_family

    base, ft1, ft2 = make_family(tmp_path, "llama", seed=5, layers=2, tie=stored)
    cfg = smoke(tmp_path, **{"models": {"base": str(base), "sources": [str(ft1), str(ft2)]}, "merge.method": "ties",
                             "optimizer": {"name": "random", "budget": 2, "batch": 2}, "space.layers_per_group": 1})  # fmt: skip
    assert cli("search", cfg).returncode == 0
    exp = tmp_path / "exp"
    done = cli("export", exp, tmp_path / "model")
    assert done.returncode == 0, done.stderr
    best = max((c for c in journal(exp)[0]), key=lambda r: r[3])
    db = sqlite3.connect(exp / "experiment.sqlite")
    recipe = json.loads(
        db.execute("SELECT recipe FROM candidates WHERE generation=? AND idx=?", best[:2]).fetchone()[0]
    )
    db.close()
    ckpts = [Checkpoint.open(p) for p in (base, ft1, ft2)]
    target = load_target(ckpts[0])
    engine = MergeEngine(ckpts[0], ckpts[1:], Method.ties, target, exact=True, compile=False)
    parsed = Recipe.from_dict(recipe)
    assert parsed.groups["embed"].weights != parsed.groups["head"].weights  # the head's merge differs
    engine.apply(parsed)  # what the search scored
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, target(ids).logits, atol=1e-5)
    tied = target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    assert tied == (stored == "equal")


def test_failed_commit_rolls_back_and_is_one_error(tmp_path):
    from evomerge.store import Candidate, ExperimentStore

    (tmp_path / "e").mkdir()
    store = ExperimentStore.create(tmp_path / "e", {"identity": "{}"}, config_text="x: 1\n")
    store.db.execute("PRAGMA max_page_count = 40")  # a disk that fills up
    big = {"blob": "x" * 20_000}
    recorded = 0
    with pytest.raises(UserError, match="cannot write the journal .*full"):
        for i in range(100):
            store.record(Candidate(None, 0, i, [0.5], big, "ok", None, 1.0, {}, 0.1, 0.1, 1.0, 2.0))
            recorded += 1
    assert not store.db.in_transaction
    assert store.count() == recorded  # the failed one left nothing behind; earlier ones are intact
    store.db.execute("PRAGMA max_page_count = 100000")
    store.record(Candidate(None, 1, 0, [0.5], {}, "ok", None, 1.0, {}, 0.1, 0.1, 1.0, 2.0))
    assert store.count() == recorded + 1


def _stage(root: Path, name: str, source: Path, fitness: float | None) -> Path:
    from evomerge.store import ExperimentStore

    stage = _copy(source, root / name)
    db = sqlite3.connect(stage / "experiment.sqlite")
    with db:
        if fitness is None:
            db.execute("DELETE FROM candidates")
            db.execute("DELETE FROM finals")
    db.close()
    assert ExperimentStore.exists(stage)
    return stage


def test_staged_reports_order_names_and_empty_stages(tiny, tmp_path):
    from evomerge.store import experiment_dirs, mark_staged

    _, exp = tiny
    roots = []
    for r in ("one", "two"):
        root = tmp_path / r
        root.mkdir()
        _stage(root, "zeta", exp, 1.0)  # created first, listed second
        _stage(root, "alpha", exp, 1.0)
        _stage(root, "ps", exp, None)  # no evaluations yet
        mark_staged(root, ["alpha", "zeta", "ps"])
        os.utime(root / "alpha")
        (root / "alpha").chmod(0o755)  # change ctimes: the order must not follow them
        roots.append(root)
    assert [p.name for p, _ in experiment_dirs([roots[0]])] == ["alpha", "zeta", "ps"]
    done = cli("report", *roots, "--out", tmp_path / "reports")
    assert done.returncode == 0, done.stderr
    assert "no evaluations yet" in done.stdout
    written = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert written == ["one-alpha", "one-zeta", "two-alpha", "two-zeta"]


def test_batch_size_is_not_part_of_the_identity(tiny, tmp_path):
    cfg, exp = tiny
    mine = _copy(exp, tmp_path / "e")
    data = yaml.safe_load(cfg.read_text())
    data["evaluation"]["batch_size"] = 3  # lowered after an out-of-memory
    data["output"]["dir"] = str(mine)
    lowered = tmp_path / "lowered.yaml"
    lowered.write_text(yaml.safe_dump(data))
    done = cli("search", lowered, "--budget", 7)
    assert done.returncode == 0, done.stderr
    assert len(journal(mine)[0]) == 7
