"""The subspace merges (TSV-M, Iso-C, Iso-CTS, WUDI; issue 27) in evomerge itself: searched with an
`exclude`, offered as default merges, exported with an `evomerge merge` config that rebuilds the same
tensors, and their bad inputs. Their agreement with FusionBench is tests/test_fusion_bench.py's."""

import pytest
import torch
import yaml
from helpers import cli, smoke
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.merge.kernels import subspace
from evomerge.merge.methods import Method


def _weights(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_searched_with_exclude_exported_and_rebuilt(tmp_path):
    cfg = smoke(
        tmp_path,
        **{
            "merge": {"method": "iso_c", "exclude": ["embed_tokens", "lm_head"],
                      "baselines": ["tsv_m", "iso_cts", "wudi"]},
            "space": {"layers_per_group": 4},
            "optimizer.budget": 4,
            "optimizer.popsize": 4,
            "evaluation.tasks": [{"name": "zoo_math_x", "metric": "exact_match,strict-match", "limit": 8}],
            "evaluation.split": {"heldout": 8, "seed": 0},
        },
    )  # fmt: skip
    done = cli("search", cfg)
    assert done.returncode == 0, done.stderr
    exp = tmp_path / "exp"
    import sqlite3

    db = sqlite3.connect(exp / "experiment.sqlite")
    recipes = [r for (r,) in db.execute("SELECT recipe FROM candidates")]
    finals = dict(db.execute("SELECT name, status FROM finals").fetchall())
    db.close()
    assert all('"exclude": ["embed_tokens", "lm_head"]' in r for r in recipes)
    for name in ("default iso_c", "default tsv_m", "default iso_cts", "default wudi"):
        assert finals.get(name) == "ok", finals
    out = tmp_path / "winner"
    done = cli("export", exp, out)
    assert done.returncode == 0, done.stderr
    assert not (out / "mergekit_config.yml").exists()
    config = (out / "evomerge_merge.yml").read_text()
    assert config.startswith("# Rebuilds this model: evomerge merge evomerge_merge.yml OUT")
    assert "mergekit cannot" in (out / "README.md").read_text()
    assert yaml.safe_load(config)["parameters"]["exclude"][0] == {"filter": "embed_tokens", "value": True}
    again = cli("merge", out / "evomerge_merge.yml", tmp_path / "rebuilt")
    assert again.returncode == 0, again.stderr
    exported, rebuilt = _weights(out), _weights(tmp_path / "rebuilt")
    assert exported.keys() == rebuilt.keys()
    assert all(torch.equal(exported[k], rebuilt[k]) for k in exported)


def test_excluded_tensors_take_the_mean_of_the_task_vectors():
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    models = [base + 0.1 * torch.randn(6, 4) for _ in range(2)]
    spec = Method("iso_c").spec
    merged = spec.exact(
        "w", base, models, spec.tensor_params({"scaling_factor": 2.0, "exclude": True}, 2, "w")
    )
    assert torch.allclose(merged, base + 2.0 * ((models[0] - base) + (models[1] - base)) / 2, atol=1e-6)
    flat = spec.exact("w", base, models, spec.tensor_params({"scaling_factor": 1.0}, 2, "w")) - base
    s = torch.linalg.svdvals(flat)
    assert torch.allclose(s, torch.full_like(s, s.mean().item()), atol=1e-5)  # Iso-C's flat spectrum


def test_tsv_m_refuses_more_models_than_a_matrix_has_rank():
    """FusionBench keeps rank // T = 0 directions of each and silently returns zeros; refused here."""
    base = torch.zeros(2, 8)
    models = [torch.randn(2, 8) for _ in range(3)]
    spec = Method("tsv_m").spec
    with pytest.raises(UserError, match=r"tsv_m keeps min\(2, 8\) // 3 = 0 singular directions"):
        spec.exact("q_proj.weight", base, models, spec.tensor_params({}, 3, "q_proj.weight"))
    assert subspace.tsv_rank((2, 8), 2) == 1


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"merge": {"method": "ties", "exclude": ["lm_head"]}}, "ties has no matrix treatment to skip"),
        ({"merge": {"method": "iso_c", "exclude": [""]}}, "an empty string would match every tensor"),
    ],
)
def test_bad_subspace_settings_are_one_line(tmp_path, changes, needle):
    done = cli("search", smoke(tmp_path, **changes))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert not (tmp_path / "exp").exists()


def test_bfloat16_task_vectors_are_upcast_for_the_svd():
    base = torch.randn(8, 6).to(torch.bfloat16)
    models = [(base.float() + 0.1 * torch.randn(8, 6)).to(torch.bfloat16) for _ in range(2)]
    for method in ("tsv_m", "iso_c", "iso_cts", "wudi"):
        spec = Method(method).spec
        params = spec.tensor_params({"iter_num": 5.0} if method == "wudi" else {}, 2, "w")
        merged = spec.exact("w", base, models, params)
        assert merged.dtype == torch.float32 and torch.isfinite(merged).all(), method


def test_wudi_needs_a_positive_whole_iter_num():
    spec = Method("wudi").spec
    for bad, needle in ((0.0, r"iter_num must be in \(0, inf\]"), (2.5, "iter_num must be a whole number")):
        with pytest.raises(UserError, match=needle):
            spec.tensor_params({"iter_num": bad}, 2, "w")


def test_wudi_with_a_model_that_left_a_tensor_unchanged_is_finite():
    """A frozen embedding's task vector is zero: FusionBench's loss divides by its zero norm (NaN); here it
    simply adds nothing, and the result is the other task vector's WUDI."""
    torch.manual_seed(0)
    tv = torch.randn(6, 4)
    merged = subspace.wudi([tv, torch.zeros(6, 4)], iterations=20, lr=1e-3)
    assert torch.isfinite(merged).all()
    alone = subspace.wudi([tv], iterations=20, lr=1e-3)
    assert torch.allclose(merged, alone, atol=1e-6)


def test_tsv_m_with_more_models_than_a_matrix_rank_is_refused_before_anything_is_created(tmp_path):
    """A model whose key projection (2 x 4) has lower rank than the number of sources (3): one line naming the tensor, and
    `merge.exclude` is how a user keeps such tensors out of the SVD."""
    from evomerge.models.synthetic import make_family

    paths = make_family(tmp_path / "m", "llama", finetunes=3, hidden=4, layers=1)
    cfg = smoke(
        tmp_path,
        **{
            "merge": {"method": "tsv_m"},
            "models": {"base": str(paths[0]), "sources": [str(p) for p in paths[1:]]},
        },
    )
    done = cli("search", cfg)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tsv_m keeps min(" in lines[0] and "// 3 = 0 singular directions" in lines[0]
    assert not (tmp_path / "exp").exists()
