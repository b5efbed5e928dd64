import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per xdist worker (and the commands it runs):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # n workers on n cores, not n x n threads
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402

from evomerge.models.synthetic import make_family  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2")


def pytest_sessionstart(session):
    from helpers import DEVICE

    if DEVICE != "cpu":
        import torch

        if not DEVICE.startswith("cuda") or not torch.cuda.is_available():
            pytest.exit(f"EVOMERGE_TEST_DEVICE={DEVICE}: no such device here (cpu, or cuda with a GPU)", 2)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Tiny random base + two fine-tunes per family, float32: {family: [base, ft1, ft2]}."""
    root = tmp_path_factory.mktemp("zoo")
    return {family: make_family(root, family, seed=i + 1, layers=3) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def cluster():
    """A private 2-CPU Ray cluster, started once: in-process searches use it, CLI searches join it by
    its address (runtime.ray.address)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # token auth on (Ray's default)
    os.environ["RAY_AUTH_MODE"] = "token"  # what a process joining it needs (CLI searches in subprocesses)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def finished_smoke(tmp_path_factory):
    """A finished one-round smoke experiment (6 evaluations + finals), run once per session: (config,
    experiment dir). Tests that change it work on a copy."""
    from helpers import cli, smoke

    tmp = tmp_path_factory.mktemp("finished")
    cfg = smoke(tmp, **{"optimizer.budget": 6})
    done = cli("search", cfg)
    assert done.returncode == 0, done.stderr
    return cfg, tmp / "exp"


@pytest.fixture(scope="session")
def fidelity_runs(tmp_path_factory):
    """The smoke search in each cheap fitness mode on the local executor, run once per session on first
    use and shared (test_fidelity checks them, test_ray compares Ray against them): mode -> (cfg, exp,
    completed process)."""
    from helpers import FIDELITY_MODES, cli, smoke

    runs = {}

    def get(mode: str):
        if mode not in runs:
            tmp = tmp_path_factory.mktemp(mode)
            cfg = smoke(tmp, **{"evaluation.fidelity": FIDELITY_MODES[mode]})
            done = cli("search", cfg)
            assert done.returncode == 0, done.stderr
            runs[mode] = (cfg, tmp / "exp", done)
        return runs[mode]

    return get
