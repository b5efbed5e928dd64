"""TSV-M, Iso-C, Iso-CTS and WUDI against FusionBench 0.2.33's own functions (issue 27), on tiny Llama,
Mistral and Qwen2 models with three fine-tunes each. FusionBench lives in a venv of its own
(`.venv-fusionbench`, built by `.ci/run`; or EVOMERGE_FUSIONBENCH_PYTHON) and runs in a subprocess
(tests/oracles/fusion_bench_merge.py): its dependencies never enter evomerge's environment. Both sides
run on one thread (their SVDs depend on the thread count)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO
from safetensors.torch import load_file, save_file

from evomerge.merge.methods import Method
from evomerge.models.checkpoint import Checkpoint
from evomerge.models.synthetic import make_family

pytestmark = pytest.mark.slow
ORACLE = REPO / "tests" / "oracles" / "fusion_bench_merge.py"
EXCLUDED = ("model.embed_tokens.weight", "lm_head.weight")
JOBS = {  # name: (method, evomerge parameters, FusionBench parameters, exclude the embeddings and head)
    "tsv_m": ("tsv_m", {"alpha": 0.7}, {"alpha": 0.7}, False),
    "tsv_m-exclude": ("tsv_m", {"alpha": 1.0}, {"alpha": 1.0}, True),
    "iso_c": ("iso_c", {"scaling_factor": 1.3}, {"scaling_factor": 1.3}, False),
    "iso_c-exclude": ("iso_c", {"scaling_factor": 0.9}, {"scaling_factor": 0.9}, True),
    "iso_cts": (
        "iso_cts",
        {"scaling_factor": 1.2, "common_space_fraction": 0.8},
        {"scaling_factor": 1.2, "common_space_fraction": 0.8},
        False,
    ),
    "iso_cts-exclude": (
        "iso_cts",
        {"scaling_factor": 1.0, "common_space_fraction": 0.5},
        {"scaling_factor": 1.0, "common_space_fraction": 0.5},
        True,
    ),
    "wudi": ("wudi", {"iter_num": 60.0, "lr": 1e-5}, {"iter_num": 60}, False),
    "wudi-exclude": ("wudi", {"iter_num": 40.0, "lr": 1e-5}, {"iter_num": 40}, True),
}


@pytest.fixture(scope="session")
def fusion_bench():
    python = Path(
        os.environ.get("EVOMERGE_FUSIONBENCH_PYTHON", REPO / ".venv-fusionbench" / "bin" / "python")
    )
    if not python.exists():
        pytest.skip(f"FusionBench oracle tests skipped: no FusionBench venv at {python} (.ci/run builds it)")
    probe = subprocess.run(
        [str(python), "-c", "import fusion_bench.method.wudi.wudi, safetensors"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"FusionBench oracle tests skipped: {python} cannot import fusion_bench ({last})")
    return python


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def oracle_run(request, tmp_path_factory, fusion_bench):
    """One family's base + three fine-tunes, and FusionBench's merge of them for every job."""
    root = tmp_path_factory.mktemp(f"fb-{request.param}")
    paths = make_family(root, request.param, finetunes=3, seed=11, layers=2)
    base, *fts = [Checkpoint.open(p) for p in paths]
    names = sorted(base.tensors)
    base_t = {n: base.get(n).float().clone() for n in names}
    models = [{n: ft.get(n).float().clone() for n in names} for ft in fts]
    tensors = {f"base.{n}": base_t[n] for n in names}
    for i, m in enumerate(models):
        tensors.update({f"tv{i}.{n}": (m[n] - base_t[n]).contiguous() for n in names})
    save_file(tensors, root / "in.safetensors")
    jobs = [
        {"method": method, "params": fb, "exclude_keys": list(EXCLUDED) if excl else [], "out": str(root / f"{k}.st")}
        for k, (method, _, fb, excl) in JOBS.items()
    ]  # fmt: skip
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run(
        [str(fusion_bench), str(ORACLE), str(root / "in.safetensors"), str(root / "jobs.json")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return base_t, models, {k: load_file(root / f"{k}.st") for k in JOBS}


@pytest.mark.parametrize("job", list(JOBS))
def test_merge_equals_fusion_bench(oracle_run, job):
    """Every tensor (2-D ones through the subspace merge, 1-D and excluded ones through the mean) within
    1e-5 relative (Frobenius) of FusionBench's, float32, one thread."""
    base, models, theirs = oracle_run
    method, params, _, excl = JOBS[job]
    spec = Method(method).spec
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, want in theirs[job].items():
            p = spec.tensor_params({**params, "exclude": excl and name in EXCLUDED}, len(models), name)
            got = spec.exact(name, base[name], [m[name] for m in models], p)
            error = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
            assert error <= 1e-5, f"{job} {name}: relative error {error:.2e}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_regmean_equals_fusion_bench(tmp_path, fusion_bench, family):
    """RegMean's merge from the same Gram matrices (evomerge's own, from real forward passes of each
    model) equals FusionBench's merging_with_regmean_weights: Linear weights by the regression, the rest
    averaged."""
    from evomerge.merge.calibration import linear_grams
    from evomerge.models.loading import load_target

    paths = make_family(tmp_path, family, finetunes=2, seed=5, layers=2)
    base, *fts = [Checkpoint.open(p) for p in paths]
    names = sorted(base.tensors)
    base_t = {n: base.get(n).float().clone() for n in names}
    models = [{n: ft.get(n).float().clone() for n in names} for ft in fts]
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    grams = {}
    for i, ft in enumerate(fts):
        model = load_target(ft, device="cpu")
        model.load_state_dict({n: models[i][n] for n in names}, strict=False)
        for key, g in linear_grams(model, [(ids, mask)]).items():
            grams[f"gram{i}.{key[: -len('.weight')]}"] = g.contiguous()
    save_file(grams, tmp_path / "grams.st")
    tensors = {f"base.{n}": base_t[n] for n in names}
    for i, m in enumerate(models):
        tensors.update({f"tv{i}.{n}": (m[n] - base_t[n]).contiguous() for n in names})
    save_file(tensors, tmp_path / "in.st")
    job = {"method": "regmean", "params": {"grams": str(tmp_path / "grams.st"), "reduce_non_diagonal_ratio": 0.3},
           "out": str(tmp_path / "regmean.st")}  # fmt: skip
    (tmp_path / "jobs.json").write_text(json.dumps([job]))
    done = subprocess.run(
        [str(fusion_bench), str(ORACLE), str(tmp_path / "in.st"), str(tmp_path / "jobs.json")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = load_file(tmp_path / "regmean.st")
    from evomerge.merge import kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        linear = 0
        for name, want in theirs.items():
            per = [m[name] for m in models]
            key = name[: -len(".weight")]
            if f"gram0.{key}" in grams:
                got = kernels.regmean.regmean(per, [grams[f"gram{i}.{key}"] for i in range(2)], 0.3)
                linear += 1
            else:
                got = kernels.regmean.weighted_mean(per)
            error = (torch.linalg.norm(got - want) / torch.linalg.norm(want)).item()
            assert error <= 1e-5, f"{name}: relative error {error:.2e}"
        assert linear >= 14  # q, k, v, o, gate, up, down in each of 2 layers, and the head
    finally:
        torch.set_num_threads(threads)
