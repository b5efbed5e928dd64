"""The search: config schema, genome codec, optimizers, the SQLite store, and real `evomerge search` runs
on the shipped zoo (including kill -9 at random moments and resuming)."""

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, SMOKE, kill_and_resume
from helpers import cli as _cli
from helpers import journal as _journal
from helpers import smoke as _smoke

from evomerge.config import SpaceSpec, parse_config
from evomerge.errors import UserError
from evomerge.merge.methods import Method
from evomerge.search.space import Space, default_params
from evomerge.store import Candidate, ExperimentStore


def _minimal(**changes):
    cfg = {
        "models": {"base": "b", "sources": ["s1", "s2"]},
        "evaluation": {"tasks": [{"name": "zoo_math_x"}]},
        "output": {"dir": "x"},
    }
    cfg.update(changes)
    return cfg


# -- schema -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"space": {"density": {"min": 0}}}, "space.density.min: must be in (0, 1]"),
        ({"space": {"weight": {"min": 2, "max": 1}}}, "space.weight: min (2.0) is above max (1.0)"),
        ({"space": {"layer_per_group": 2}}, "space.layer_per_group: unknown key"),
        ({"optimizer": {"name": "cma", "sigma0": "big"}}, "optimizer.sigma0: Input should be a valid number"),
        (
            {"optimizer": {"name": "cma", "popsize": 1}},
            "optimizer.popsize: Input should be greater than or equal to 2",
        ),
        ({"optimizer": {"name": "bayes"}}, "optimizer: Input tag 'bayes' found using 'name' does not match"),
        ({"merge": {"method": "slerp"}}, "slerp merges models.base with exactly one source"),
        ({"models": {"sources": ["a"]}}, "needs models.base"),
        ({"evaluation": {"tasks": []}}, "evaluation.tasks: List should have at least 1 item"),
        ({"runtime": {"dtype": "int8"}}, "runtime.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ],
)
def test_schema_names_the_key(changes, message):
    with pytest.raises(UserError) as err:
        parse_config(_minimal(**changes))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_validate_cli_ok_and_bad(tmp_path):
    done = _cli("validate", SMOKE)
    assert done.returncode == 0, done.stderr
    assert "16 genes" in done.stdout and "valid" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_minimal(space={"density": {"min": 1.5}})))
    done = _cli("validate", bad)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {bad}: space.density.min: must be in (0, 1]"]
    missing = _smoke(tmp_path, **{"models.sources": [str(tmp_path / "nope"), str(REPO / "zoo" / "lang-x")]})
    done = _cli("validate", missing)
    assert done.returncode == 2 and "model directory not found" in done.stderr


def test_validate_points_a_merge_config_to_evomerge_merge():
    done = _cli("validate", REPO / "configs" / "example-ties.yaml")
    assert (
        done.returncode == 2
        and "is a mergekit merge config" in done.stderr
        and "evomerge merge" in done.stderr
    )


def test_validate_unknown_task_suggests(tmp_path):
    done = _cli(
        "validate",
        _smoke(tmp_path, evaluation={"tasks": [{"name": "zoo_math_xx"}], "split": {"heldout": 300}}),
    )
    assert done.returncode == 2
    assert "unknown task 'zoo_math_xx'" in done.stderr and "zoo_math_x" in done.stderr


def test_validate_hub_models_unchecked_offline(tmp_path):
    done = _cli("validate", REPO / "configs" / "evollm-jp.yaml")
    assert done.returncode == 0, done.stderr
    assert "unchecked" in done.stdout


# -- genome codec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("split, per", [(False, 1), (True, 1), (False, 3)])
def test_codec_round_trip(method, split, per):
    sources = method.spec.inputs or 2
    if not method.spec.genes:  # model_stock, karcher, passthrough: baselines, nothing to search
        with pytest.raises(UserError, match="no parameter to search"):
            Space(SpaceSpec(split=split, layers_per_group=per), method, sources, num_layers=4)
        return
    space = Space(SpaceSpec(split=split, layers_per_group=per), method, sources, num_layers=4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        genome = rng.uniform(0, 1, space.size)
        recipe = space.decode(genome)
        if method.spec.repair is None:
            assert np.allclose(space.encode(recipe), genome)
        else:  # a repaired gene (DELLA's epsilon) moves once, then stays
            again = space.encode(recipe)
            assert np.allclose(space.encode(space.decode(again)), again)
        assert set(recipe.groups) == set(space.all_groups)


def test_codec_layout_and_defaults():
    spec = SpaceSpec(layers_per_group=2, weight={"min": 0.0, "max": 2.0}, density={"min": 0.2, "max": 1.0})
    space = Space(spec, Method.ties, 2, num_layers=4)
    assert [b.name for b in space.blocks] == ["embed", "layers.0-1", "layers.2-3", "head"]
    assert space.size == 16 and space.default_popsize() == 4 + int(3 * np.log(16))
    mid = space.decode(space.start())
    assert mid.groups["layers.1"].weights == (1.0, 1.0)
    assert mid.groups["layers.1"].densities == pytest.approx((0.6, 0.6))
    genome = np.zeros(16)
    genome[
        space.genes.index(
            next(g for g in space.genes if g.block == "layers.2-3" and g.source == 1 and g.kind == "density")
        )
    ] = 1
    recipe = space.decode(genome)
    assert recipe.groups["layers.3"].densities == pytest.approx((0.2, 1.0))
    assert recipe.groups["layers.0"].densities == pytest.approx((0.2, 0.2))
    out = space.decode(np.full(16, 7.0))  # clipped into the box
    assert out.groups["head"].weights == (2.0, 2.0)
    no_embed = Space(SpaceSpec(embeddings=False), Method.dare_ties, 2, num_layers=4)
    assert no_embed.decode(no_embed.start()).groups["embed"] == default_params(Method.dare_ties, 2)


# -- optimizers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opt",
    [
        {"name": "cma", "popsize": 6},
        {"name": "nevergrad", "optimizer": "TwoPointsDE", "batch": 4},
        {"name": "random", "batch": 5},
    ],
)
def test_optimizer_replay_resumes_identically(opt):
    """Resume rebuilds the optimizer and replays the told losses: the trajectory is the same as the
    uninterrupted one, whatever happened to global RNG state in between (lm-eval reseeds numpy's)."""
    from evomerge.config import ExperimentConfig
    from evomerge.search.optimizers import make_optimizer
    from evomerge.search.run import Schedule

    spec = ExperimentConfig.model_validate(_minimal(optimizer={**opt, "budget": 60})).optimizer

    def new():
        return Schedule.start(make_optimizer(spec, np.full(5, 0.5), 6, overlap=2), overlap=2)

    def run(split_at):
        s, told = new(), []
        seen = []
        for g in range(5):
            if g == split_at:  # "kill": a new process replays what the journal holds
                np.random.seed(999)
                s = new()
                for losses in told:
                    s.tell(losses)
            xs = s.rounds[g]
            assert len(xs) == s.batch and len(s.rounds[g + 1]) == 2  # the next round's first two are out
            seen.append(np.array(xs))
            losses = [float(np.sum((x - 0.3) ** 2)) for x in xs]
            told.append(losses)
            s.tell(losses)
        return seen

    straight, resumed = run(-1), run(3)
    assert all(np.array_equal(a, b) for a, b in zip(straight, resumed, strict=True))
    assert all(((0 <= s) & (s <= 1)).all() for s in straight)


def test_nevergrad_refuses_what_cannot_resume():
    from evomerge.config import NevergradSpec
    from evomerge.search.optimizers import check_replayable

    with pytest.raises(UserError, match="NGOpt .*helper thread"):
        check_replayable(NevergradSpec(name="nevergrad", optimizer="NGOpt", batch=1), 4, 1, 0)
    with pytest.raises(UserError, match="did you mean"):
        check_replayable(NevergradSpec(name="nevergrad", optimizer="TwoPointDE"), 4, 4, 2)
    check_replayable(NevergradSpec(name="nevergrad", optimizer="TwoPointsDE"), 4, 4, 2)


# -- store ------------------------------------------------------------------------------------------


def test_store_is_wal_and_atomic(tmp_path):
    (tmp_path / "e").mkdir()
    store = ExperimentStore.create(tmp_path / "e", {"identity": "{}"}, config_text="x: 1\n")
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = Candidate(
        None, 0, 0, [0.5], {"method": "ties"}, "failed", "boom", float("-inf"), {}, 0.1, 0.2, 1.0, 2.0
    )
    store.record(row)
    with pytest.raises(sqlite3.IntegrityError):  # a candidate is journaled once
        store.record(row)
    store.close()
    again = ExperimentStore.open(tmp_path / "e")
    [got] = again.candidates()
    assert got.reason == "boom" and got.fitness == float("-inf") and not got.ok
    assert again.count() == 1
    assert not list((tmp_path / "e").glob(".*partial"))
    with pytest.raises(UserError, match="already holds an experiment"):
        ExperimentStore.create(tmp_path / "e", {}, config_text="")


# -- real searches ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The smoke search, uninterrupted: the reference for every resume test."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = _smoke(tmp)
    done = _cli("search", cfg)
    assert done.returncode == 0, done.stderr
    return cfg, tmp / "exp", done


def test_search_end_to_end(straight):
    cfg, exp, done = straight
    rows, finals = _journal(exp)
    assert len(rows) == 24 and {r[4] for r in rows} == {"ok"}
    assert set(finals) == {
        "evolved",
        "default dare_ties",
        "parent math-en",
        "parent lang-x",
        "default task_arithmetic",
        "default ties",
    }
    assert "smoke: held-out (24 evaluations)" in done.stdout and "gain over best" in done.stdout
    assert str(exp) in done.stdout
    assert (exp / "search.log").read_text().count("candidate ") >= 24
    assert yaml.safe_load((exp / "config.yaml").read_text())["optimizer"]["budget"] == 24
    # done: running again evaluates nothing new and prints the same leaderboard
    again = _cli("search", cfg)
    assert again.returncode == 0, again.stderr
    assert _journal(exp) == (rows, finals)
    # an experiment made before an optional key (default None) joined the schema still resumes
    db = sqlite3.connect(exp / "experiment.sqlite")
    identity = json.loads(db.execute("SELECT value FROM meta WHERE key='identity'").fetchone()[0])
    identity.pop("dfs")
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='identity'", (json.dumps(identity),))
    db.close()
    assert _cli("search", cfg).returncode == 0


def test_resume_refuses_changed_config_and_fresh_needs_force(straight, tmp_path):
    cfg, exp, _ = straight
    data = yaml.safe_load(cfg.read_text())
    data["merge"]["method"] = "ties"
    data["space"]["split"] = True
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    done = _cli("search", changed)
    assert done.returncode == 2
    assert "changed: merge.method, space.split" in done.stderr
    done = _cli("search", cfg, "--fresh")
    assert done.returncode == 2 and "--force" in done.stderr
    assert len(_journal(exp)[0]) == 24


def test_budget_raise_extends(straight, tmp_path):
    cfg, exp, _ = straight
    out = tmp_path / "short"
    first = _cli("search", cfg, "--out", out, "--budget", 9)  # stops inside the second round of 6
    assert first.returncode == 0, first.stderr
    rows, _ = _journal(out)
    assert len(rows) == 9
    second = _cli("search", cfg, "--out", out)
    assert second.returncode == 0, second.stderr
    assert _journal(out) == _journal(exp)


class _Payload:
    """What an attacker plants: unpickling it runs a shell command."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_planted_pickle_in_an_experiment_is_never_run(straight, tmp_path):
    """The optimizer is rebuilt by replaying the journal: a pickle planted where older versions kept the
    optimizer's state is never loaded, and the resumed run still ends exactly like the uninterrupted one."""
    cfg, exp, _ = straight
    out = tmp_path / "planted"
    assert _cli("search", cfg, "--out", out, "--budget", 9).returncode == 0
    flag = tmp_path / "pwned"
    db = sqlite3.connect(out / "experiment.sqlite")
    with db:
        db.execute("INSERT OR REPLACE INTO optimizer VALUES (1, 1, ?, 0)", (pickle.dumps(_Payload(flag)),))
    db.close()
    for command in (("search", cfg, "--out", out), ("report", out), ("export", out, tmp_path / "model")):
        done = _cli(*command)
        assert done.returncode == 0, done.stderr
    assert not flag.exists()
    assert _journal(out) == _journal(exp)


def test_edited_journal_is_refused_on_resume(straight, tmp_path):
    cfg, _, _ = straight
    out = tmp_path / "edited"
    assert _cli("search", cfg, "--out", out, "--budget", 9).returncode == 0
    db = sqlite3.connect(out / "experiment.sqlite")
    with db:
        db.execute("UPDATE candidates SET genome = '[0.1, 0.2]' WHERE generation = 0 AND idx = 2")
    db.close()
    done = _cli("search", cfg, "--out", out)
    assert done.returncode == 2 and "does not reproduce candidate 0.2" in done.stderr


@pytest.mark.slow
def test_killed_and_resumed_ends_like_uninterrupted(straight, tmp_path):
    """kill -9 the real command at random moments (several times), resume each time: same journal, same
    best recipe and fitness, same held-out finals as the uninterrupted run."""
    cfg, exp, _ = straight
    out = tmp_path / "killed"
    killed_at = kill_and_resume(cfg, out, budget=24, seed=1234)
    assert len(killed_at) >= 4 and any(0 < n < 24 for n, _ in killed_at), killed_at
    assert _journal(out) == _journal(exp)

    def best(d):
        return (
            sqlite3.connect(d / "experiment.sqlite")
            .execute(
                "SELECT recipe, fitness FROM candidates WHERE status='ok' ORDER BY fitness DESC, id LIMIT 1"
            )
            .fetchone()
        )

    assert best(out) == best(exp)


def test_failed_candidates_are_journaled_then_stop(tmp_path):
    # weights of 1e38 overflow float32: every candidate's logits are non-finite
    cfg = _smoke(tmp_path, **{"space.weight": {"min": 1e38, "max": 1e38}, "runtime.stop_after_failures": 3})
    done = _cli("search", cfg)
    assert done.returncode == 2
    assert "the first 3 candidates all failed" in done.stderr and "non-finite logits" in done.stderr
    rows, _ = _journal(tmp_path / "exp")
    assert len(rows) == 3 and {r[4] for r in rows} == {"failed"} and all(r[3] == float("-inf") for r in rows)
    # with a higher limit the run goes on through every failure to the end of its budget
    cfg = _smoke(
        tmp_path,
        **{
            "space.weight": {"min": 1e38, "max": 1e38},
            "runtime.stop_after_failures": 100,
            "optimizer.budget": 8,
            "output.dir": str(tmp_path / "exp2"),
        },
    )
    done = _cli("search", cfg)
    assert done.returncode == 2 and "no candidate succeeded" in done.stderr
    assert len(_journal(tmp_path / "exp2")[0]) == 8


def test_ctrl_c_saves_and_exits_130(tmp_path):
    cfg = _smoke(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--budget", "400"], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip (a budget it cannot finish first; SIGINT as a terminal has it, even when the tests
    # run as a background job, whose children inherit SIGINT ignored)
    db = tmp_path / "exp" / "experiment.sqlite"
    deadline = time.time() + 120
    while time.time() < deadline:
        if db.exists() and sqlite3.connect(db).execute("SELECT COUNT(*) FROM candidates").fetchone()[0] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode()
    assert len(_journal(tmp_path / "exp")[0]) >= 2


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "nevergrad", "optimizer": "TwoPointsDE", "budget": 10, "batch": 4},
        {"name": "random", "budget": 10, "batch": 4},
    ],
)
def test_other_optimizers_run_and_resume(tmp_path, optimizer):
    cfg = _smoke(tmp_path, optimizer={**optimizer, "seed": 3})
    first = _cli("search", cfg, "--budget", 6)
    assert first.returncode == 0, first.stderr
    second = _cli("search", cfg)
    assert second.returncode == 0, second.stderr
    resumed, _ = _journal(tmp_path / "exp")
    straight = _cli("search", cfg, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    assert resumed == _journal(tmp_path / "straight")[0] and len(resumed) == 10


def test_overlap_larger_than_a_round_is_refused(tmp_path):
    done = _cli("validate", _smoke(tmp_path, **{"optimizer.overlap": 7}))
    assert done.returncode == 2 and "optimizer.overlap (7) exceeds the round size (6)" in done.stderr
    done = _cli("validate", _smoke(tmp_path, **{"optimizer.overlap": 2}))
    assert done.returncode == 0 and "6 candidates per round (2 asked ahead)" in done.stdout
