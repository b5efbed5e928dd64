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
    ("nearswap", "nearswap", [(0, None), (1, None)], {"t": 0.001}, 0),
    ("nearswap-gradient", "nearswap", [(0, None), (2, None)], {"t": [0.0001, 0.01]}, 0),
    ("passthrough-scale", "passthrough", [(1, {"scale": 0.7})], None, None),
    ("multislerp-base", "multislerp", [(1, {"weight": 0.3}), (2, {"weight": [0.9, 0.2]})], None, 0),
    ("multislerp-no-base", "multislerp", [(0, {"weight": 0.5}), (1, {"weight": 0.2}), (2, {"weight": 0.3})],
     {"normalize_weights": False}, None),
    ("model-stock", "model_stock", [(1, None), (2, None)], None, 0),
    ("model-stock-filter-wise", "model_stock", [(1, None), (2, None)], {"filter_wise": True}, 0),
    ("sce", "sce", [(1, None), (2, None)], None, 0),
    ("sce-topk", "sce", [(1, None), (2, None)], {"select_topk": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}, 0),
    ("nuslerp-flat-base", "nuslerp", [(1, {"weight": 0.3}), (2, {"weight": 0.6})], None, 0),
    ("nuslerp-row-wise", "nuslerp", [(1, {"weight": [0.2, 0.8]}), (2, {"weight": 0.5})],
     {"nuslerp_flatten": False, "nuslerp_row_wise": True}, None),
    ("nuslerp-columns", "nuslerp", [(1, {"weight": 0.4}), (2, {"weight": 0.4})], {"nuslerp_flatten": False}, 0),
    ("karcher", "karcher", [(0, None), (1, None), (2, None)], None, None),
    ("karcher-short", "karcher", [(1, None), (2, None)], {"max_iter": 2, "tol": 1e-3}, None),
    ("arcee-fusion", "arcee_fusion", [(0, None), (1, None)], None, 0),
    ("ram", "ram", [(1, None), (2, None)], None, 0),
    ("ram-epsilon", "ram", [(1, None), (2, None)], {"epsilon": 1e-3}, 0),
    ("ramplus-tl", "ramplus_tl", [(1, None), (2, None)], {"r": 0.3, "alpha": [0.1, 0.6]}, 0),
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


# (name, method, slices as [(zoo index, layer_range, source parameters)...] with slice parameters, global
# parameters, base index or None); the zoo models have 3 layers
SLICES = [
    ("stack", "passthrough", [([(1, [0, 2], None)], None), ([(2, [1, 3], None)], None), ([(1, [2, 3], None)], None)],
     None, None),
    ("stack-scaled", "passthrough", [([(2, [0, 3], {"scale": 0.5})], None), ([(1, [0, 1], None)], None)], None, None),
    ("slerp-slices", "slerp", [([(0, [0, 2], None), (1, [0, 2], None)], None),
                                ([(0, [1, 3], None), (2, [1, 3], None)], {"t": 0.8})], {"t": [0.0, 1.0]}, 0),
    ("ties-slices", "ties", [([(0, [0, 3], None), (1, [0, 3], {"weight": 0.7, "density": 0.4}),
                               (2, [0, 3], {"weight": [0.2, 0.9]})], {"density": 0.6}),
                              ([(0, [2, 3], None), (1, [1, 2], {"weight": 1.0}), (2, [2, 3], {"weight": 0.5})], None)],
     {"normalize": True}, 0),
]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name,method,slices,params,base", SLICES, ids=[c[0] for c in SLICES])
def test_slices_match_mergekit(zoo, tmp_path, family, name, method, slices, params, base):
    from transformers import AutoModelForCausalLM

    paths = zoo[family]
    cfg = {
        "slices": [
            {
                "sources": [
                    {"model": str(paths[i]), "layer_range": r, **({"parameters": p} if p else {})}
                    for i, r, p in sources
                ],
                **({"parameters": sp} if sp else {}),
            }  # fmt: skip
            for sources, sp in slices
        ],
        "merge_method": method,
        "dtype": "float32",
    }
    if params:
        cfg["parameters"] = params
    if base is not None:
        cfg["base_model"] = str(paths[base])
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(cfg))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    merge_from_config(config, ours)
    try:
        _run_mergekit(cfg, theirs)
    except Exception as exc:  # mergekit 0.1.5 writes the tensors, then cannot save a config whose
        # layer_types (Qwen2) no longer match the new depth; evomerge rewrites them (checked below)
        assert "layer_types" in str(exc), exc
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(a) == set(b)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-5, f"{name}/{family}: max abs diff {worst}"
    depth = sum(sources[0][1][1] - sources[0][1][0] for sources, _ in slices)
    model = AutoModelForCausalLM.from_pretrained(ours)
    assert model.config.num_hidden_layers == depth
    layer_types = getattr(model.config, "layer_types", None)
    assert layer_types is None or len(layer_types) == depth
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in a.items())


def test_slices_bad_input(zoo, tmp_path):
    from evomerge.errors import UserError

    paths = zoo["llama"]
    bad = [
        ({"slices": [{"sources": [{"model": str(paths[1]), "layer_range": [0, 2]},
                                  {"model": str(paths[2]), "layer_range": [0, 3]}]}], "merge_method": "linear"},
         "same number of layers"),
        ({"slices": [{"sources": [{"model": str(paths[1]), "layer_range": [2, 9]}]}], "merge_method": "passthrough"},
         "goes past them"),
        ({"slices": [{"sources": [{"model": str(paths[1]), "layer_range": [0, 2]},
                                  {"model": str(paths[2]), "layer_range": [0, 2]}]}], "merge_method": "passthrough"},
         "takes exactly 1"),
        ({"slices": [{"sources": [{"model": str(paths[1]), "layer_range": [0, 2]}]}],
          "models": [{"model": str(paths[1])}], "merge_method": "passthrough"}, "not both"),
    ]  # fmt: skip
    for cfg, message in bad:
        config = tmp_path / "merge.yml"
        config.write_text(yaml.safe_dump(cfg))
        with pytest.raises(UserError, match=message):
            merge_from_config(config, tmp_path / "out")
        assert not (tmp_path / "out").exists()


SEARCHABLE = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "nearswap",
              "multislerp", "nuslerp", "sce", "ramplus_tl"]  # fmt: skip


@pytest.mark.parametrize("method", SEARCHABLE)
def test_searched_recipe_exports_to_what_mergekit_rebuilds(zoo, tmp_path, method):
    """A recipe decoded from a random genome (genes per layer half) becomes a mergekit config (filters per
    group) that mergekit merges into the tensors evomerge's exact kernels give that recipe."""
    import numpy as np

    from evomerge.config import SpaceSpec
    from evomerge.export import recipe_to_mergekit
    from evomerge.merge.methods import Method, merge_tensor
    from evomerge.models.architecture import merged_names
    from evomerge.models.checkpoint import Checkpoint
    from evomerge.models.compat import check_compatible
    from evomerge.search.space import Space

    m = Method(method)
    paths = zoo["qwen2"]
    base_path = None if not (m.spec.needs_base or m.spec.optional_base) else paths[0]
    sources = [p for p in paths if p != base_path][: m.spec.inputs or 3]
    ckpts = [Checkpoint.open(p) for p in ([base_path] if base_path else []) + sources]
    family = check_compatible(ckpts)
    first = ckpts[0]
    names = merged_names(list(first.tensors), family, first.ties_embeddings(family))
    space = Space(SpaceSpec(split=True), m, len(sources), num_layers=first.num_layers, seed=3)
    recipe = space.decode(np.random.default_rng(1).uniform(0, 1, space.size))
    cfg = recipe_to_mergekit(recipe, str(base_path) if base_path else None, [str(p) for p in sources], family,
                             names, "float32")  # fmt: skip
    theirs = tmp_path / "theirs"
    _run_mergekit(cfg, theirs)
    ref = load_file(theirs / "model.safetensors")
    params = recipe.tensor_params(names, family)
    base = ckpts[0] if base_path else None
    inputs = ckpts[1:] if base_path else ckpts
    worst = 0.0
    for name in names:
        ours = merge_tensor(
            m, name, base.get(name) if base else None, [c.get(name) for c in inputs], params[name]
        )
        worst = max(worst, (ours - ref[name].float()).abs().max().item())
    assert worst <= 1e-5, f"{method}: max abs diff {worst}"
