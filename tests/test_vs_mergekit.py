"""`evomerge merge` against mergekit 0.1.5 itself (the dev extra) on tiny Llama, Mistral and Qwen2 models."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge.offline import merge_from_config
from tests.conftest import FAMILIES

mergekit = pytest.importorskip("mergekit")


def _models(paths, spec):
    return [{"model": str(paths[i]), **({"parameters": p} if p else {})} for i, p in spec]


# (name, method, models as (zoo index, parameters), global parameters, base index or None)
CONFIGS = [
    ("linear-normalized", "linear", [(0, {"weight": 0.2}), (1, {"weight": 0.5}), (2, {"weight": 0.3})], None, None),
    ("linear-raw-gradient", "linear", [(1, {"weight": [0.1, 0.9]}), (2, {"weight": 0.4})], {"normalize": False}, None),
    ("ta-plain", "task_arithmetic", [(1, {"weight": 0.6}), (2, {"weight": 0.4})], None, 0),
    ("ta-lambda-normalize", "task_arithmetic", [(1, {"weight": [1.0, 0.2, 0.5]}), (2, {"weight": 0.7})],
     {"lambda": 0.8, "normalize": True}, 0),
    ("ties-basic", "ties", [(1, {"weight": 0.5, "density": 0.5}), (2, {"weight": 0.5, "density": 0.5})], None, 0),
    ("ties-filters-gradients", "ties",
     [(1, {"weight": [0.2, 0.8], "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}),
      (2, {"weight": 0.6, "density": [0.9, 0.2]})], {"lambda": 1.2}, 0),
    ("ties-unnormalized-global", "ties", [(1, None), (2, None)],
     {"weight": 0.7, "density": 0.35, "normalize": False}, 0),
    ("dare-ties-density-1", "dare_ties", [(1, {"weight": 0.5, "density": 1.0}), (2, {"weight": 0.8})], None, 0),
    ("dare-linear-density-1", "dare_linear", [(1, {"weight": [0.3, 0.6]}), (2, {"weight": 0.4})],
     {"normalize": True, "density": 1.0}, 0),
    ("breadcrumbs", "breadcrumbs", [(1, {"weight": 0.6, "density": 0.7, "gamma": 0.05}), (2, {"weight": [0.2, 0.9]})],
     {"density": 0.5}, 0),
    ("breadcrumbs-rescale", "breadcrumbs", [(1, {"weight": 0.5, "density": 0.4}), (2, {"weight": 0.5, "gamma": 0.0})],
     {"rescale": True, "lambda": 0.9}, 0),
    ("breadcrumbs-ties", "breadcrumbs_ties",
     [(1, {"weight": 0.7, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}], "gamma": 0.02}),
      (2, {"weight": 0.4, "density": 0.6})], {"normalize": True}, 0),
    ("della-density-1", "della", [(1, {"weight": 0.6, "density": 1.0}), (2, {"weight": [0.3, 0.8], "density": 1.0})],
     None, 0),
    ("della-linear-density-1", "della_linear", [(1, {"weight": 0.6}), (2, {"weight": 0.5})],
     {"density": 1.0, "epsilon": 0.05, "normalize": True}, 0),
    ("slerp-scalar", "slerp", [(0, None), (1, None)], {"t": 0.35}, 0),
    ("slerp-filters", "slerp", [(0, None), (2, None)],
     {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]}, 0),
]  # fmt: skip


def _write_config(tmp_path, paths, method, spec, params, base):
    cfg = {"models": _models(paths, spec), "merge_method": method, "dtype": "float32"}
    if params:
        cfg["parameters"] = params
    if base is not None:
        cfg["base_model"] = str(paths[base])
    file = tmp_path / "merge.yml"
    file.write_text(yaml.safe_dump(cfg))
    return file, cfg


def _run_mergekit(cfg, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(cfg), str(out), MergeOptions(copy_tokenizer=True, quiet=True))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,method,spec,params,base", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_mergekit(zoo, tmp_path, family, name, method, spec, params, base):
    paths = zoo[family]
    config, cfg = _write_config(tmp_path, paths, method, spec, params, base)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge_from_config(config, ours)
    _run_mergekit(cfg, theirs)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, f"{name}/{family}: max abs diff {worst}"
    # and the merge changed something relative to every input (the comparison is not vacuous)
    src = load_file(paths[1] / "model.safetensors")
    assert any(not torch.equal(a[k], src[k]) for k in a)


def test_output_loads_with_transformers(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config, _ = _write_config(tmp_path, zoo["qwen2"], *CONFIGS[4][1:])
    merge_from_config(config, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # (AutoTokenizer would pick Qwen2Tokenizer by model_type for this word-level test tokenizer)
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    merged = load_file(tmp_path / "out" / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in merged.items())
