"""RegMean in evomerge (issue 27): the Gram matrices against a hand computation (padding left out), a
search that calibrates once and merges from them, and its bad inputs. Its merge against FusionBench's
own function: tests/test_fusion_bench.py."""

import sqlite3

import pytest
import torch
from helpers import cli, smoke
from safetensors.torch import load_file

from evomerge.merge.calibration import linear_grams
from evomerge.models.checkpoint import Checkpoint
from evomerge.models.loading import load_target
from evomerge.models.synthetic import make_family


def test_grams_equal_a_hand_computation_without_the_padding(tmp_path):
    path = make_family(tmp_path, "llama", finetunes=1, seed=3, layers=2)[1]
    model = load_target(Checkpoint.open(path), device="cpu")
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    grams = linear_grams(model, [(ids, mask)])
    # the first layer's attention projections read the embeddings through the input norm
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    rows = x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()].double()
    want = (rows.T @ rows / rows.shape[0]).float()
    for proj in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(
            grams[f"model.layers.0.self_attn.{proj}.weight"], want, rtol=1e-5, atol=1e-6
        )
    everything = x.reshape(-1, x.shape[-1]).double()  # FusionBench's hook: padding included
    assert not torch.allclose(want, (everything.T @ everything / everything.shape[0]).float(), atol=1e-4)
    assert "lm_head.weight" in grams and len(grams) == 2 * 7 + 1


def _regmean(tmp_path, **changes):
    return smoke(
        tmp_path,
        **{
            "merge": {"method": "regmean", "calibration": {"task": "zoo_math_x", "items": 8}},
            "optimizer.budget": 4,
            "optimizer.popsize": 4,
            "evaluation.tasks": [{"name": "zoo_math_x", "metric": "exact_match,strict-match", "limit": 8}],
            "evaluation.split": {"heldout": 8, "seed": 0},
            **changes,
        },
    )


@pytest.mark.slow
def test_regmean_search_calibrates_once_and_merges_from_the_grams(tmp_path):
    done = cli("search", _regmean(tmp_path))
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "exp" / "search.log").read_text()
    assert log.count("calibration: Gram matrices of 57 linear layers from 8 items of zoo_math_x") == 1
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    ok = db.execute("SELECT COUNT(*) FROM candidates WHERE status='ok'").fetchone()[0]
    finals = dict(db.execute("SELECT name, status FROM finals").fetchall())
    db.close()
    assert ok == 4 and finals["default regmean"] == "ok" and finals["evolved"] == "ok"
    # export computes the Grams again from the experiment's calibration prompts and writes them beside an
    # evomerge merge config; evomerge merge of that config rebuilds the exported tensors exactly
    out = tmp_path / "out"
    done = cli("export", tmp_path / "exp", out)
    assert done.returncode == 0, done.stderr
    assert len((out / "calibration.jsonl").read_text().splitlines()) == 8
    assert "calibration:\n  texts: calibration.jsonl" in (out / "evomerge_merge.yml").read_text()
    assert "mergekit cannot" in (out / "README.md").read_text()
    again = cli("merge", out / "evomerge_merge.yml", tmp_path / "rebuilt")
    assert again.returncode == 0, again.stderr
    exported, rebuilt = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "rebuilt" / "model.safetensors"),
    )
    assert exported.keys() == rebuilt.keys() and all(torch.equal(exported[k], rebuilt[k]) for k in exported)
    from helpers import REPO

    sources = [load_file(REPO / "zoo" / n / "model.safetensors") for n in ("math-en", "lang-x")]
    q = "model.layers.3.self_attn.q_proj.weight"  # a Linear weight: the regression, not the mean
    mean = (sources[0][q].float() + sources[1][q].float()) / 2
    assert (exported[q].float() - mean).abs().max() > 1e-3
    (out / "evomerge_merge.yml").write_text(
        (out / "evomerge_merge.yml").read_text().replace("calibration:\n  texts: calibration.jsonl\n", "")
    )
    missing = cli("merge", out / "evomerge_merge.yml", tmp_path / "none")
    assert (
        missing.returncode == 2
        and "regmean merges from activation statistics: add calibration" in missing.stderr
    )


@pytest.mark.slow
def test_a_resumed_regmean_search_computes_the_same_grams(tmp_path):
    """The Grams are not journaled: a run extended with --budget computes them again from the config and
    scores exactly what the uninterrupted run scored."""
    from helpers import journal

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    whole = _regmean(tmp_path / "a", **{"optimizer.budget": 8})
    assert cli("search", whole).returncode == 0
    parts = _regmean(tmp_path / "b", **{"optimizer.budget": 4})
    assert cli("search", parts).returncode == 0
    done = cli("search", parts, "--budget", 8)
    assert done.returncode == 0, done.stderr
    assert journal(tmp_path / "a" / "exp") == journal(tmp_path / "b" / "exp")


@pytest.mark.parametrize(
    ("merge", "needle"),
    [
        ({"method": "regmean"}, "regmean merges from activation statistics: set merge.calibration"),
        ({"method": "ties", "baselines": ["regmean"]}, "regmean merges from activation statistics"),
        (
            {"method": "regmean", "calibration": {"task": "zoo_math_en", "items": 8}},
            "merge.calibration.task: 'zoo_math_en' is not one of evaluation.tasks",
        ),
        ({"method": "regmean", "calibration": {"task": "zoo_math_x", "items": 0}}, "items"),
    ],
)
def test_bad_regmean_settings_are_one_line(tmp_path, merge, needle):
    done = cli("search", _regmean(tmp_path, merge=merge))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert not (tmp_path / "exp").exists()
