"""The Ray executor on a real local Ray cluster (2 CPUs, started once per test session) and the zoo:
same journal as the local executor, a killed worker costs one retry, a candidate that keeps killing its
worker is journaled as failed, a killed driver resumes (on either executor), and bad worker counts are one-line errors."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FIDELITY_MODES, MULTI_OPTIMIZERS, REPO, cli, journal, pareto, smoke

pytestmark = pytest.mark.slow  # a real Ray cluster per session, several real searches


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The smoke search on the local executor: the reference journal."""
    tmp = tmp_path_factory.mktemp("local")
    done = cli("search", smoke(tmp))
    assert done.returncode == 0, done.stderr
    return journal(tmp / "exp")


def _actor_pids(busy: bool) -> list[int]:
    """Processes of our Ray workers (their titles name the method they are running)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::EvalWorker.run" if busy else "ray::EvalWorker"):
            found.append(int(entry.name))
    return found


def _count(exp: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{exp / 'experiment.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def _search(cfg: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "search", str(cfg), *args], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def test_ray_two_workers_journal_equals_local(tmp_path, cluster, local_run):
    from evomerge.experiment import run_search

    cfg = smoke(tmp_path, **{"runtime.executor": "ray", "runtime.ray.workers": 2})
    (result,) = run_search(cfg)
    assert result.evaluations == 24
    rows, finals = journal(tmp_path / "exp")
    assert rows == local_run[0]
    assert finals == local_run[1]
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    # candidates really ran side by side: some started before the previous one finished
    spans = db.execute("SELECT started_at, finished_at FROM candidates ORDER BY started_at").fetchall()
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


def _scores(exp: Path):
    con = sqlite3.connect(exp / "experiment.sqlite")
    try:
        return con.execute("SELECT owner, status, fitness, item_evals FROM scores ORDER BY owner").fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("mode", ["subsample", "anchors", "racing"])
def test_ray_equals_local_in_every_fidelity_mode(tmp_path, cluster, fidelity_runs, mode):
    """What a job scores is a function of the journal, never of which worker finished first: the same
    candidates, estimates, re-scores, anchor evidence and racing rungs on two Ray workers as locally."""
    from evomerge.experiment import run_search

    _, local, _ = fidelity_runs(mode)
    cfg = smoke(
        tmp_path,
        **{"evaluation.fidelity": FIDELITY_MODES[mode], "runtime.executor": "ray", "runtime.ray.workers": 2},
    )
    (result,) = run_search(cfg)
    assert result.evaluations == 24 and result.finals
    assert journal(tmp_path / "exp") == journal(local)
    assert _scores(tmp_path / "exp") == _scores(local)


@pytest.mark.parametrize("optimizer", list(MULTI_OPTIMIZERS.values()), ids=list(MULTI_OPTIMIZERS))
def test_ray_equals_local_for_the_multi_objective_and_archive_optimizers(tmp_path, cluster, optimizer):
    """NSGA-II, M2N2 and MAP-Elites are told whole rounds in a fixed order: the same candidates, front
    and archive finals on two Ray workers as on the local executor."""
    from evomerge.experiment import run_search

    spec = {**optimizer, "budget": 12, "seed": 0}
    run_search(pareto(tmp_path, "local", optimizer=spec))
    run_search(
        pareto(tmp_path, "ray", optimizer=spec, **{"runtime.executor": "ray", "runtime.ray.workers": 2})
    )
    local, remote = _by_place(tmp_path / "local"), _by_place(tmp_path / "ray")
    assert len(local[0]) == 12 and len(local[1]) > 3
    assert remote == local


def _by_place(exp: Path):
    """The journal with finals named by their candidate's place in the run (generation.idx) rather than
    its journal id, which depends on which worker finished first."""
    rows, finals = journal(exp)
    db = sqlite3.connect(exp / "experiment.sqlite")
    place = {cid: f"{g}.{i}" for cid, g, i in db.execute("SELECT id, generation, idx FROM candidates")}
    named = dict(db.execute("SELECT name, candidate_id FROM finals").fetchall())
    db.close()
    renamed = {}
    for name, fitness in finals.items():
        cid = named[name]
        renamed[name.replace(f"candidate {cid}", f"candidate at {place[cid]}") if cid else name] = fitness
    return rows, renamed


def test_killed_worker_is_retried_on_a_new_one(tmp_path, cluster, local_run):
    cfg = smoke(tmp_path, **{"runtime.ray.address": cluster})
    proc = _search(cfg, "--executor", "ray", "--workers", "2")
    killed, deadline = None, time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        busy = _actor_pids(busy=True)
        if killed is None and busy and _count(tmp_path / "exp") >= 5:
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    assert killed is not None
    rows, finals = journal(tmp_path / "exp")
    assert rows == local_run[0]  # nothing lost, nothing twice, same numbers
    assert finals == local_run[1]
    log = (tmp_path / "exp" / "search.log").read_text()
    assert log.count("retrying on a new worker") == 1


def test_candidate_that_kills_three_workers_is_journaled_failed(tmp_path, cluster):
    cfg = smoke(tmp_path, **{"runtime.ray.address": cluster, "optimizer.budget": 8})
    proc = _search(cfg, "--executor", "ray", "--workers", "1")
    kills, deadline = [], time.time() + 300
    while proc.poll() is None and time.time() < deadline and len(kills) < 3:
        busy = _actor_pids(busy=True)
        if busy and _count(tmp_path / "exp") >= 2 and busy[0] not in kills:
            kills.append(busy[0])
            os.kill(busy[0], signal.SIGKILL)
        time.sleep(0.01)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert len(kills) == 3
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    rows = db.execute("SELECT generation, idx, status, reason FROM candidates").fetchall()
    assert len(rows) == 8 and len({(g, i) for g, i, _, _ in rows}) == 8
    failed = [r for r in rows if r[2] == "failed"]
    assert len(failed) == 1 and "worker died 3 times" in failed[0][3]


def test_killed_ray_driver_resumes_locally_then_on_ray(tmp_path, cluster, local_run):
    cfg = smoke(tmp_path, **{"runtime.ray.address": cluster})
    proc = _search(cfg, "--executor", "ray", "--workers", "2")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and _count(tmp_path / "exp") < 7:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 7 <= _count(tmp_path / "exp") < 24
    deadline = time.time() + 60  # the dead driver's workers go with it
    while _actor_pids(busy=False) and time.time() < deadline:
        time.sleep(0.2)
    # the executor is not part of the experiment: resume on the local one for a while, then on Ray again
    done = cli("search", cfg, "--budget", "16")
    assert done.returncode == 0, done.stderr
    assert _count(tmp_path / "exp") == 16
    done = cli("search", cfg, "--executor", "ray", "--workers", "2")
    assert done.returncode == 0, done.stderr
    rows, finals = journal(tmp_path / "exp")
    assert rows == local_run[0] and finals == local_run[1]


def test_worker_count_errors_are_one_line(tmp_path, cluster):
    cfg = smoke(tmp_path, **{"runtime.ray.address": cluster})
    done = cli("search", cfg, "--workers", "2")
    assert (
        done.returncode == 2
        and done.stderr.strip() == "error: --workers applies to the ray executor: add --executor ray"
    )
    done = cli("search", cfg, "--executor", "ray", "--workers", "3")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "3 workers × 1 CPUs need 3 CPUs" in done.stderr
    assert not (tmp_path / "exp" / "experiment.sqlite").exists() or _count(tmp_path / "exp") == 0


_JOIN = """
import ray, sys
ray.init(address=sys.argv[1], log_to_driver=False)
print("joined")
"""


def test_private_cluster_refuses_clients_without_its_token(tmp_path):
    """The private cluster that `--executor ray` starts keeps Ray's token authentication on: its services
    listen on the network, so a process without the token (another user, another host) cannot join."""
    starter = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys, time\n"
         "from evomerge.runtime.ray_executor import start_ray\n"
         "start_ray(None)\nprint(ray.get_runtime_context().gcs_address, flush=True)\n"
         "sys.stdin.readline()\nray.shutdown()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"},
    )  # fmt: skip
    try:
        address = starter.stdout.readline().strip()
        assert address, "the private cluster did not start"
        stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        stranger["HOME"] = str(tmp_path)  # no ~/.ray/auth_token
        for mode in ("token", "disabled"):
            done = subprocess.run(
                [sys.executable, "-c", _JOIN, address], capture_output=True, text=True, timeout=120,
                env={**stranger, "RAY_AUTH_MODE": mode},
            )  # fmt: skip
            assert done.returncode != 0 and "joined" not in done.stdout, (mode, done.stdout)
        owner = subprocess.run(  # the same user, who holds the token, joins (a client must ask for token mode)
            [sys.executable, "-c", _JOIN, address], capture_output=True, text=True, timeout=120,
            env={**os.environ, "RAY_AUTH_MODE": "token"},
        )  # fmt: skip
        assert "joined" in owner.stdout, owner.stderr[-500:]
    finally:
        starter.communicate("stop\n", timeout=60)  # the starter shuts its cluster down


def test_private_cluster_will_not_start_without_auth(tmp_path):
    done = cli("search", smoke(tmp_path), "--executor", "ray", env_extra={"RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 2 and "RAY_AUTH_MODE=disabled" in done.stderr, done.stderr
    assert not (tmp_path / "exp").exists()


def test_ray_equals_local_for_a_migrated_mergekit_evolve_run(tmp_path, cluster):
    """A mergekit-evolve config (slerp over three models: the pool engine picks each slice's pair) runs
    the same candidates and finals on two Ray workers as on the local executor."""
    from helpers import evolve

    cfg = evolve(
        tmp_path,
        genome={"merge_method": "slerp", "base_model": None, "filters": None, "layer_granularity": 2,
                "models": [str(REPO / "zoo" / n) for n in ("math-en", "lang-x", "compare-en")]},
    )  # fmt: skip
    local = cli("search", cfg, "--out", tmp_path / "local", "--max-fevals", "8")
    assert local.returncode == 0, local.stderr
    remote = cli(
        "search", cfg, "--out", tmp_path / "ray", "--max-fevals", "8", "--executor", "ray", "--workers", "2"
    )
    assert remote.returncode == 0, remote.stderr
    assert _by_place(tmp_path / "ray") == _by_place(tmp_path / "local")
    assert len(journal(tmp_path / "local")[0]) == 8
