"""Optimizers behind ask/tell replay exactly (resume), and the SQLite store journals atomically."""

import sqlite3

import numpy as np
import pytest
from helpers import minimal_config

from evomerge.errors import UserError
from evomerge.store import Candidate, ExperimentStore

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

    spec = ExperimentConfig.model_validate(minimal_config(optimizer={**opt, "budget": 60})).optimizer

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


def test_cma_loads_without_plotting_or_scipy_and_keeps_its_trajectory():
    """cma imports matplotlib.pyplot and scipy.stats for features the search never uses (a second of every
    search's start-up); the optimizer keeps them out, and CMA-ES proposes exactly what plain cma does."""
    import subprocess
    import sys

    check = "assert 'matplotlib' not in sys.modules and 'scipy' not in sys.modules, 'imported'\n"
    code = (
        "import sys, numpy as np\n"
        "from evomerge.config import CmaSpec\n"
        "from evomerge.search.optimizers import CmaOptimizer\n"
        "opt = CmaOptimizer(CmaSpec(name='cma', seed=3), np.full(5, 0.5), popsize=6)\n"
        "CHECK"
        "x = opt.ask(6)\n"
        "opt.tell(x, [float(v.sum()) for v in x])\n"
        "import cma, matplotlib.pyplot, scipy.stats  # both still importable afterwards\n"
        "print(repr([round(float(v), 12) for v in opt.ask(6)[0]]))\n"
    )

    def proposals(program: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, check=True
        ).stdout

    guarded = proposals(code.replace("CHECK", check))
    plain = proposals("import matplotlib.pyplot, scipy.stats\n" + code.replace("CHECK", ""))
    assert guarded == plain and guarded.startswith("[")
