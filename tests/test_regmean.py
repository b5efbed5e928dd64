"""RegMean in evomerge (issue 27): the Gram matrices against a hand computation (padding left out), a
search that calibrates once and merges from them, and its bad inputs. Its merge against FusionBench's
own function: tests/test_fusion_bench.py."""

import sqlite3

import pytest
import torch
from helpers import cli, smoke

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
    refused = cli("export", tmp_path / "exp", tmp_path / "out")
    assert refused.returncode == 2 and "export of regmean are not built yet" in refused.stderr
    assert not (tmp_path / "out").exists()


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
