"""The genome codec: genome <-> recipe for every searchable method, layout and defaults."""

import numpy as np
import pytest

from evomerge.config import SpaceSpec
from evomerge.errors import UserError
from evomerge.merge.methods import Method
from evomerge.search.space import Space, default_params

# -- genome codec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("split, per", [(False, 1), (True, 1), (False, 3)])
def test_codec_round_trip(method, split, per):
    sources = method.spec.inputs or 2
    if not method.spec.genes:  # model_stock, karcher, passthrough: baselines, nothing to search
        with pytest.raises(UserError, match="no parameter to search"):
            Space(SpaceSpec(split=split, layers_per_group=per), method, sources, num_layers=4)
        return
    space = Space(SpaceSpec(split=split, layers_per_group=per), method, sources, num_layers=4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        genome = rng.uniform(0, 1, space.size)
        recipe = space.decode(genome)
        if method.spec.repair is None:
            assert np.allclose(space.encode(recipe), genome)
        else:  # a repaired gene (DELLA's epsilon) moves once, then stays
            again = space.encode(recipe)
            assert np.allclose(space.encode(space.decode(again)), again)
        assert set(recipe.groups) == set(space.all_groups)


def test_codec_layout_and_defaults():
    spec = SpaceSpec(layers_per_group=2, weight={"min": 0.0, "max": 2.0}, density={"min": 0.2, "max": 1.0})
    space = Space(spec, Method.ties, 2, num_layers=4)
    assert [b.name for b in space.blocks] == ["embed", "layers.0-1", "layers.2-3", "head"]
    assert space.size == 16 and space.default_popsize() == 4 + int(3 * np.log(16))
    mid = space.decode(space.start())
    assert mid.groups["layers.1"].weights == (1.0, 1.0)
    assert mid.groups["layers.1"].densities == pytest.approx((0.6, 0.6))
    genome = np.zeros(16)
    genome[
        space.genes.index(
            next(g for g in space.genes if g.block == "layers.2-3" and g.source == 1 and g.kind == "density")
        )
    ] = 1
    recipe = space.decode(genome)
    assert recipe.groups["layers.3"].densities == pytest.approx((0.2, 1.0))
    assert recipe.groups["layers.0"].densities == pytest.approx((0.2, 0.2))
    out = space.decode(np.full(16, 7.0))  # clipped into the box
    assert out.groups["head"].weights == (2.0, 2.0)
    no_embed = Space(SpaceSpec(embeddings=False), Method.dare_ties, 2, num_layers=4)
    assert no_embed.decode(no_embed.start()).groups["embed"] == default_params(Method.dare_ties, 2)


def test_gene_ranges_are_the_methods_unless_the_config_sets_them():
    """nearswap's t is a distance (default range [0, 0.001]), not slerp's [0, 1] fraction; weight and
    density keep SpaceSpec's ranges, which equal the methods' own."""

    def t_range(spec):
        return next(g for g in Space(spec, Method.nearswap, 1, num_layers=2).genes if g.kind == "t")

    assert (t_range(SpaceSpec()).low, t_range(SpaceSpec()).high) == (0.0, 0.001)
    chosen = t_range(SpaceSpec(t={"min": 0.0, "max": 0.5}))
    assert (chosen.low, chosen.high) == (0.0, 0.5)
    ties = Space(SpaceSpec(), Method.ties, 2, num_layers=2)
    assert {(g.kind, g.low, g.high) for g in ties.genes} == {("weight", 0.0, 1.0), ("density", 0.1, 1.0)}


def test_stored_recipes_parse_to_what_they_are():
    """A journaled recipe (JSON) comes back as its type: parameter-space or data-flow."""
    import json

    from evomerge.merge.recipe import PathRecipe, Recipe, parse_recipe

    ps = Recipe.uniform(
        Method.ties, ["embed", "layers.0-1"], weights=(0.5, 0.7), densities=(0.3, 0.9), seed=7
    )
    assert parse_recipe(json.loads(json.dumps(ps.to_dict()))) == ps
    path = PathRecipe(((0, 0), (1, 2), (0, 3)), (1.0, 0.5, 1.25))
    assert parse_recipe(json.loads(json.dumps(path.to_dict()))) == path
    with pytest.raises(UserError, match="2 layers but 1 scales"):
        parse_recipe({"kind": "dfs", "path": [[0, 0], [0, 1]], "scales": [1.0]})
