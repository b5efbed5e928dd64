"""mergekit-evolve's genome (issue 28): one genotype means the same merge config in evomerge as in
mergekit 0.1.5's own `ModelGenome.genotype_merge_config`, for every method, with and without
layer_granularity, filters, smooth and negative weights; the initial genotype is mergekit's."""

import itertools

import pytest
import torch

from evomerge.mergekit_evolve import METHOD_PARAMS, EvolveGenome
from evomerge.models.synthetic import make_family

evo = pytest.importorskip("mergekit.evo.genome", reason="mergekit 0.1.5 (the dev oracle) is not installed")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return [str(p) for p in make_family(tmp_path_factory.mktemp("evolve"), "llama", finetunes=3, layers=4)]


def _genomes(models, method, granularity, filters, smooth, negative):
    """(mergekit's ModelGenome, evomerge's EvolveGenome) of one genome section over `models` (base first)."""
    base, *fts = models
    definition = {
        "models": fts, "merge_method": method, "base_model": None if method in ("linear", "slerp") else base,
        "layer_granularity": granularity, "filters": filters, "smooth": smooth, "allow_negative_weights": negative,
    }  # fmt: skip
    return evo.ModelGenome(evo.ModelGenomeDefinition.model_validate(definition)), EvolveGenome.model_validate(
        definition
    )


VARIANTS = list(
    itertools.product(METHOD_PARAMS, [0, 2], [None, ["self_attn", "mlp"]], [False, True], [False, True])
)


@pytest.mark.parametrize(
    ("method", "granularity", "filters", "smooth", "negative"),
    [v for v in VARIANTS if not (v[0] == "slerp" and (v[2] or v[3]))],  # slerp takes neither (both refuse)
)
def test_a_genotype_means_the_same_merge_as_in_mergekit(
    models, method, granularity, filters, smooth, negative
):
    theirs, ours = _genomes(models, method, granularity, filters, smooth, negative)
    assert torch.equal(ours.initial_genotype(4), theirs.initial_genotype())
    genotype = torch.randn(ours.shape(4), generator=torch.Generator().manual_seed(7)) * 0.6
    for g in (genotype, genotype.flatten().numpy(), theirs.initial_genotype()):
        from mergekit.config import MergeConfiguration

        assert MergeConfiguration.model_validate(ours.merge_config(g, 4)) == theirs.genotype_merge_config(g)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"merge_method": "della"}, "mergekit-evolve has no 'della'"),
        ({"merge_method": "ties", "base_model": None}, "base_model is required for ties"),
        ({"merge_method": "slerp", "smooth": True}, "smooth is not supported for slerp"),
    ],
)
def test_bad_genomes_are_one_line(models, changes, needle):
    from pydantic import ValidationError

    definition = {"models": models[1:], "merge_method": "ties", "base_model": models[0], **changes}
    with pytest.raises(ValidationError, match=needle):
        EvolveGenome.model_validate(definition)
    with pytest.raises(ValueError, match="layer_granularity 3 does not divide the models' 4 layers"):
        EvolveGenome.model_validate(
            {"models": models[1:], "merge_method": "linear", "layer_granularity": 3}
        ).shape(4)


@pytest.mark.parametrize(
    ("method", "granularity", "filters", "smooth"),
    [("ties", 2, ["self_attn", "mlp"], False), ("linear", 2, None, True), ("slerp", 2, None, False),
     ("task_arithmetic", 0, ["mlp"], True)],
)  # fmt: skip
def test_the_merged_tensors_are_mergekits(models, tmp_path, method, granularity, filters, smooth):
    """evomerge merge of the config our mapping gives equals mergekit's merge of its own (float32)."""
    import yaml
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    from evomerge.merge.offline import merge_from_config

    theirs, ours = _genomes(models, method, granularity, filters, smooth, True)
    genotype = torch.rand(ours.shape(4), generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1
    mine = {k: v for k, v in ours.merge_config(genotype, 4).items() if v is not None} | {"dtype": "float32"}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(mine))
    merge_from_config(tmp_path / "merge.yml", tmp_path / "ours")
    config = theirs.genotype_merge_config(genotype).model_copy(update={"dtype": "float32"})
    run_merge(config, str(tmp_path / "theirs"), MergeOptions(copy_tokenizer=True, quiet=True))
    a, b = (
        load_file(tmp_path / "ours" / "model.safetensors"),
        load_file(tmp_path / "theirs" / "model.safetensors"),
    )
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, f"max abs diff {worst}"


@pytest.mark.parametrize(
    ("method", "granularity", "filters", "smooth", "finetunes"),
    [("ties", 2, ["self_attn", "mlp"], False, 3), ("linear", 2, None, True, 3), ("slerp", 1, None, False, 3),
     ("task_arithmetic", 0, ["mlp"], True, 3), ("dare_ties", 2, None, False, 3), ("slerp", 0, None, False, 2)],
)  # fmt: skip
def test_the_search_merges_a_candidate_in_place_as_evomerge_merge_does(
    models, tmp_path, method, granularity, filters, smooth, finetunes
):
    """The search applies a migrated run's candidate (a merge config) in memory: with the resident engine
    (slerp: a pool it picks each slice's pair from), the weights equal `evomerge merge` of that config."""
    import yaml
    from safetensors.torch import load_file

    from evomerge.merge.config_apply import config_params
    from evomerge.merge.engine import MergeEngine
    from evomerge.merge.methods import parse_method
    from evomerge.merge.offline import merge_from_config
    from evomerge.models.checkpoint import Checkpoint
    from evomerge.models.loading import load_target

    base, *fts = models[: finetunes + 1]
    uses_base = method not in ("linear", "slerp")
    genome = EvolveGenome.model_validate({
        "models": fts, "merge_method": method, "base_model": base if uses_base else None,
        "layer_granularity": granularity, "filters": filters, "smooth": smooth,
    })  # fmt: skip
    genotype = torch.rand(genome.shape(4), generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1
    config = genome.merge_config(genotype, 4)
    offline = {k: v for k, v in config.items() if v is not None} | {"dtype": "float32"}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(offline))
    merge_from_config(tmp_path / "merge.yml", tmp_path / "out")
    expected = load_file(tmp_path / "out" / "model.safetensors")

    pool = method == "slerp"
    sources = [Checkpoint.open(m) for m in fts]
    target = load_target(sources[0], device="cpu", dtype=torch.float32)
    engine = MergeEngine(
        Checkpoint.open(base) if uses_base else None, sources, parse_method(method), target, pool=pool
    )
    params, pick = config_params(
        config, engine.names, engine.family, 4, fts, base if uses_base else None, pool=pool
    )
    engine.apply(params, pick)
    worst = max((engine.targets[n] - expected[n]).abs().max().item() for n in engine.names)
    assert worst <= 1e-5, f"max abs diff {worst}"
    if pool and granularity:  # the pairs really change between layer groups (else this tests nothing)
        assert len({pick[n] for n in engine.names}) > 1
