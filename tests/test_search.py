"""Real `evomerge search` runs on the shipped zoo: end to end, resume (including kill -9 at random
moments), budget raises, refused edits, failures, ctrl-c, other optimizers."""

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, kill_and_resume
from helpers import cli as _cli
from helpers import journal as _journal
from helpers import smoke as _smoke

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


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert done.returncode == 2 and "journal row 3 was changed after it was written" in done.stderr
    db = sqlite3.connect(out / "experiment.sqlite")  # as a journal from before row checksums: the replay
    with db:  # still finds the edit
        db.execute("UPDATE candidates SET checksum = NULL")
        db.execute("DELETE FROM meta WHERE key = 'checksums_from'")
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


@pytest.mark.slow
def test_failed_candidates_are_journaled_then_stop(tmp_path):
    # weights of 1e38 overflow float32: every candidate's logits are non-finite
    cfg = _smoke(tmp_path, **{"space.weight": {"min": 1e38, "max": 1e38}, "runtime.stop_after_failures": 3})
    done = _cli("search", cfg)
    assert done.returncode == 2
    assert "the first 3 candidates all failed" in done.stderr
    assert "non-finite logits" in done.stderr or "is not finite" in done.stderr
    rows, _ = _journal(tmp_path / "exp")
    assert len(rows) == 3 and {r[4] for r in rows} == {"failed"} and all(r[3] == float("-inf") for r in rows)
    # resumed, the guard still holds: this run's first 3 fail too and it stops (it used to run the budget out)
    done = _cli("search", cfg)
    assert done.returncode == 2 and "the last 3 candidates all failed" in done.stderr, done.stderr
    assert len(_journal(tmp_path / "exp")[0]) == 6
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
        [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--budget", "400"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
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
@pytest.mark.slow
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
