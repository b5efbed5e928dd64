"""Data-flow-space candidates: layer paths over resident source layers, checked against hand-built models
(real transformers models of the Llama, Mistral and Qwen2 families)."""

import gc
import json
import sqlite3
from pathlib import Path

import psutil
import pytest
import torch
from helpers import DEVICE, REPO
from helpers import cli as _cli
from transformers import AutoModelForCausalLM

from evomerge.errors import UserError
from evomerge.merge.dfs import path_model

FAMILIES = ("llama", "mistral", "qwen2")


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hand_built(sources, path, embed_scale=1.0, ends=(0, 0)):
    """A standard model of A's class with the path's layers copied in (what the path must equal), its
    embeddings from sources[ends[0]] and its final norm and lm_head from sources[ends[1]]."""
    a = sources[0]
    config = a.config.__class__.from_dict(a.config.to_dict())
    config.num_hidden_layers = len(path)
    if ends != (0, 0):
        config.tie_word_embeddings = False
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [sources[s].config.layer_types[i] for s, i in path]
    model = type(a)(config).to(a.device).eval()
    state = {}
    for key, value in a.state_dict().items():
        if ".layers." not in key:
            state[key] = value
    for hop, (s, i) in enumerate(path):
        prefix = f"model.layers.{i}."
        for key, value in sources[s].state_dict().items():
            if key.startswith(prefix):
                state[f"model.layers.{hop}." + key[len(prefix) :]] = value
    embed, head = sources[ends[0]], sources[ends[1]]
    state["model.embed_tokens.weight"] = embed.state_dict()["model.embed_tokens.weight"] * embed_scale
    state["model.norm.weight"] = head.state_dict()["model.norm.weight"]
    state["lm_head.weight"] = head.lm_head.weight.detach()  # a tied head is its model's embeddings
    model.load_state_dict(state, strict=False)
    return model


IDS = torch.tensor([[1, 5, 9, 4, 12, 7, 3, 8], [1, 6, 6, 2, 11, 10, 5, 4]])


def _greedy(model, steps=6):
    return model.generate(IDS, max_new_tokens=steps, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_path_equals_model_a(zoo, family):
    base, ft1, _ = zoo[family]
    a, b = _load(ft1), _load(base)
    layers = a.config.num_hidden_layers
    model = path_model([a, b], [(0, i) for i in range(layers)])
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, a(IDS).logits, atol=1e-5)
    assert torch.equal(_greedy(model), _greedy(a))  # generation runs through the per-hop caches


@pytest.mark.parametrize("family", FAMILIES)
def test_repeated_and_mixed_layers_equal_a_hand_built_model(zoo, family):
    base, ft1, ft2 = zoo[family]
    sources = [_load(ft1), _load(ft2)]
    path = [(0, 0), (1, 1), (0, 1), (0, 1), (1, 2), (0, 2)]  # layer A.1 twice in a row, B's layers between
    ours, hand = path_model(sources, path), _hand_built(sources, path)
    with torch.no_grad():
        assert torch.allclose(ours(IDS).logits, hand(IDS).logits, atol=1e-5)
    assert torch.equal(_greedy(ours), _greedy(hand))
    assert (
        ours.model.layers[2].layer.self_attn.q_proj.weight
        is sources[0].model.layers[1].self_attn.q_proj.weight
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_three_sources_and_chosen_ends_equal_a_hand_built_model(zoo, family, tmp_path):
    from evomerge.models.synthetic import make_family

    base, ft1, ft2 = zoo[family]
    sources = [_load(ft1), _load(ft2), _load(base)]
    path = [(2, 0), (0, 1), (1, 1), (2, 2), (0, 2)]
    for ends in ((1, 2), (2, 2), (0, 1)):
        ours, hand = path_model(sources, path, ends=ends), _hand_built(sources, path, ends=ends)
        with torch.no_grad():
            assert torch.allclose(ours(IDS).logits, hand(IDS).logits, atol=1e-5)
        assert torch.equal(_greedy(ours), _greedy(hand))
        assert ours.model.embed_tokens is sources[ends[0]].model.embed_tokens
        assert ours.lm_head is sources[ends[1]].lm_head and ours.model.norm is sources[ends[1]].model.norm
    with torch.no_grad():  # the ends matter: other ends, other logits
        assert not torch.allclose(path_model(sources, path, ends=(1, 2))(IDS).logits,
                                  path_model(sources, path)(IDS).logits, atol=1e-3)  # fmt: skip
    tied = [_load(m) for m in make_family(tmp_path, family, seed=9, layers=3, tie="equal")]
    assert tied[0].lm_head.weight is tied[0].model.embed_tokens.weight
    ours, hand = path_model(tied, path, ends=(0, 1)), _hand_built(tied, path, ends=(0, 1))
    with torch.no_grad():  # A's embeddings, B's head (tied to B's embeddings)
        assert torch.allclose(ours(IDS).logits, hand(IDS).logits, atol=1e-5)
    config = sources[0].config.__class__.from_dict({**sources[0].config.to_dict(), "vocab_size": 40})
    small = type(sources[0])(config).eval()
    with pytest.raises(UserError, match="different vocabularies"):
        path_model([sources[0], small], [(0, 0)], ends=(1, 0))
    with pytest.raises(UserError, match="path end 3"):
        path_model(sources, path, ends=(3, 0))


def test_scale_multiplies_the_hidden_state_into_its_hop(zoo):
    base, ft1, _ = zoo["llama"]
    a = _load(ft1)
    path = [(0, i) for i in range(a.config.num_hidden_layers)]
    scaled = path_model([a], path, [0.7] + [1.0] * (len(path) - 1))
    with torch.no_grad():  # the first hop's input is the embedding: scaling it = scaling the embeddings
        assert torch.allclose(
            scaled(IDS).logits, _hand_built([a], path, embed_scale=0.7)(IDS).logits, atol=1e-5
        )
        assert not torch.allclose(scaled(IDS).logits, a(IDS).logits, atol=1e-3)


def test_memory_flat_over_100_candidates(zoo):
    base, ft1, ft2 = zoo["qwen2"]
    sources = [_load(ft1), _load(ft2)]
    generator = torch.Generator().manual_seed(0)
    slots = [(s, i) for s in range(2) for i in range(sources[s].config.num_hidden_layers)]

    def candidate():
        keep = torch.rand(len(slots) * 2, generator=generator) > 0.5
        path = [slots[k % len(slots)] for k in range(len(slots) * 2) if keep[k]] or [slots[0]]
        with torch.no_grad():
            path_model(sources, path, torch.rand(len(path), generator=generator) + 0.5)(IDS)

    for _ in range(10):
        candidate()
    gc.collect()
    before = psutil.Process().memory_info().rss
    for _ in range(100):
        candidate()
    gc.collect()
    assert psutil.Process().memory_info().rss - before < 20 * 1024**2


def test_evaluator_scores_path_candidates_like_models():
    """The same Evaluator (one lm-eval wrapper, one task dict) scores DFS candidates: the identity path of
    math-en scores exactly what math-en scores; a path through lang-x's layers scores what the
    equivalent standard model scores."""
    from evomerge.evaluate import EvaluationSpec, Evaluator
    from evomerge.evaluate.run import load_model_and_tokenizer

    zoo = Path(__file__).resolve().parent.parent / "zoo"
    a, tok = load_model_and_tokenizer(str(zoo / "math-en"), device=DEVICE, dtype="float32")
    b, _ = load_model_and_tokenizer(str(zoo / "lang-x"), device=DEVICE, dtype="float32")
    spec = EvaluationSpec.model_validate(
        {
            "tasks": [{"name": "zoo_math_en", "limit": 30}, {"name": "zoo_verbs_x", "limit": 30}],
            "split": {"heldout": 300},
        }
    )
    evaluator = Evaluator(a, tok, spec)
    plain = evaluator.evaluate("search")
    evaluator.set_model(path_model([a, b], [(0, i) for i in range(a.config.num_hidden_layers)]))
    assert evaluator.evaluate("search").metrics == plain.metrics
    path = [(0, 0), (1, 1), (1, 2), (0, 3), (0, 6), (0, 7)]
    evaluator.set_model(path_model([a, b], path))
    mixed = evaluator.evaluate("search")
    reference = Evaluator(_hand_built([a, b], path), tok, spec).evaluate("search")
    assert mixed.ok and mixed.metrics == reference.metrics


# -- the DFS genome ---------------------------------------------------------------------------------


def _space(layers=(4, 3), ends=(0, 0), **spec):
    from evomerge.config import DfsSpec
    from evomerge.search.dfs_space import DfsSpace

    return DfsSpace(DfsSpec(**spec), list(layers), ends)


def test_dfs_genome_layout_and_start():
    space = _space(repeats=2)
    assert space.t == 14 and space.size == 28
    assert (
        space.slots[:7] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
        and space.slots[7:] == space.slots[:7]
    )
    start = space.decode(space.start()).to_dict()
    assert start == {"kind": "dfs", "path": [[0, 0], [0, 1], [0, 2], [0, 3]], "scales": [1.0, 1.0, 1.0, 1.0]}


def test_dfs_genome_indicators_scales_ends_and_lengths():
    space = _space(repeats=2, keep_ends=False, scale_bounds={"min": 0.0, "max": 2.0})
    x = [0.0] * space.size
    for k, value in ((5, 0.9), (8, 0.6), (12, 0.7)):  # B.1, then A.1 and B.1 of the second repeat
        x[k] = value
    x[space.t + 5], x[space.t + 8], x[space.t + 12] = 0.25, 1.0, 0.5
    assert space.decode(x).to_dict() == {
        "kind": "dfs",
        "path": [[1, 1], [0, 1], [1, 1]],
        "scales": [0.5, 2.0, 1.0],
    }
    ends = _space(repeats=2, keep_ends=True).decode(x).to_dict()["path"]
    assert ends[0] == [0, 0] and ends[-1] == [0, 3] and ends[1:-1] == [[1, 1], [0, 1], [1, 1]]
    short = _space(repeats=2, keep_ends=False, max_layers=2).decode(x).to_dict()["path"]
    assert short == [[1, 1], [1, 1]]  # the two strongest indicators, in path order
    padded = _space(repeats=2, keep_ends=False, min_layers=4).decode(x).to_dict()["path"]
    assert len(padded) == 4


def test_dfs_matrix_scales_are_indexed_by_previous_and_current_layer():
    space = _space(repeats=1, keep_ends=False, scale="matrix")
    assert space.size == 7 + 49
    x = [0.0] * space.size
    x[0] = x[5] = 0.9  # A.0 then B.1 (global layer indices 0 and 5)
    x[7 + 0 * 7 + 5] = 0.75  # W[0, 5]
    assert space.decode(x).to_dict()["scales"] == [1.0, 1.5]


def test_dfs_ends_fixed_or_searched_by_a_gene_per_end():
    from evomerge.merge.recipe import PathRecipe

    fixed = _space(layers=(4, 3, 2), ends=(1, 2), repeats=1)
    assert fixed.size == 9 + 9  # no gene for fixed ends
    start = fixed.decode(fixed.start())
    assert start.ends == (1, 2) and start.to_dict()["ends"] == [1, 2]
    searched = _space(layers=(4, 3, 2), ends=(None, None), repeats=1)
    assert searched.size == 9 + 9 + 2
    x = searched.start()
    assert searched.decode(x).ends == (0, 0)  # starts in model A's bin
    assert "ends" not in searched.decode(x).to_dict()  # model A's ends: the recipe of older journals
    for gene, source in ((0.0, 0), (0.34, 1), (0.66, 1), (0.67, 2), (1.0, 2), (1.7, 2)):
        x[-2], x[-1] = gene, 1 - min(gene, 1)
        assert searched.decode(x).ends[0] == source
    half = _space(layers=(4, 3, 2), ends=(2, None), repeats=1)
    x = half.start()
    x[-1] = 0.5
    assert half.size == 19 and half.decode(x).ends == (2, 1)
    recipe = PathRecipe(((0, 1), (2, 0)), (1.0, 0.5), (2, 1))
    assert PathRecipe.from_dict(recipe.to_dict()) == recipe
    assert PathRecipe.from_dict({"kind": "dfs", "path": [[0, 1]], "scales": [1.0]}).ends == (0, 0)


def test_dfs_ends_config_names_indices_search_and_errors():
    from evomerge.config import parse_config
    from evomerge.errors import UserError

    def config(ends, **extra):
        return parse_config(
            {
                "models": {"sources": ["zoo/math-en", "zoo/lang-x", "other/compare-en"]},
                "dfs": {"ends": ends},
                "evaluation": {"tasks": [{"name": "zoo_math_x"}]},
                "output": {"dir": "x"},
                **extra,
            }
        )

    assert config("lang-x").dfs_ends() == (1, 1) and config("other/compare-en").dfs_ends() == (2, 2)
    assert config({"embeddings": "lang-x", "head": "search"}).dfs_ends() == (1, None)
    assert config("search").dfs_ends() == (None, None) and config({"head": 2}).dfs_ends() == (0, 2)
    # names resolve to indices in the identity: the same search whichever way it is written
    assert config("lang-x").identity_hash() == config(1).identity_hash()
    assert config(0).identity_hash() == config({}).identity_hash()
    assert "ends" not in config(0).identity()["dfs"]  # model A's ends: as before ends existed
    for ends, message in (
        (3, r"dfs\.ends\.embeddings: 3: there are 3 sources"),
        ({"head": "nope"}, r"dfs\.ends\.head: 'nope' is not one of the sources"),
        ({"embeddings": -1}, "a source index is 0 or more"),
        ({"tail": 1}, r"dfs\.ends\.tail: unknown key"),
    ):
        with pytest.raises(UserError, match=message):
            config(ends)
    staged = {
        "models": {"base": "b", "sources": ["s1", "zoo/lang-x"]},
        "evaluation": {"tasks": [{"name": "zoo_math_x"}]},
        "output": {"dir": "x"},
        "stages": [
            {"name": "ps"},
            {"name": "dfs", "sources": ["previous", "zoo/lang-x"], "dfs": {"ends": {"embeddings": "lang-x", "head": "previous"}}},
        ],
    }  # fmt: skip
    stage = parse_config(staged).stage_config(1, Path("/tmp/ps-best"))
    assert stage.dfs_ends() == (1, 0)
    staged["stages"][1]["dfs"]["ends"] = "s1"  # not a source of that stage
    with pytest.raises(UserError, match=r"stages\[1\] \(dfs\): dfs\.ends\.embeddings: 's1' is not one"):
        parse_config(staged)


# -- a real DFS search ------------------------------------------------------------------------------


@pytest.mark.slow
def test_dfs_search_report_and_export(tmp_path):

    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "smoke-dfs.yaml").read_text())
    names = ("math-en", "lang-x", "compare-en")
    cfg["models"] = {"sources": [str(REPO / "zoo" / n) for n in names]}
    cfg["dfs"]["ends"] = "search"
    cfg["output"]["dir"] = str(tmp_path / "exp")
    path = tmp_path / "dfs.yaml"
    path.write_text(yaml.safe_dump(cfg))

    done = _cli("search", path)
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    recipes = [json.loads(r[0]) for r in db.execute("SELECT recipe FROM candidates")]
    assert len(recipes) == 24 and all(r["kind"] == "dfs" for r in recipes)
    assert any(len(r["path"]) != 8 or any(s != 1.0 for s in r["scales"]) for r in recipes)
    assert all(len(r["path"]) <= 10 for r in recipes)  # max_layers 8, plus the two kept ends
    assert {s for r in recipes for s, _ in r["path"]} == {0, 1, 2}  # three models in the paths
    assert {tuple(r.get("ends", (0, 0))) for r in recipes} - {(0, 0)}  # the ends genes move
    finals = {r[0] for r in db.execute("SELECT name FROM finals")}
    assert finals == {"evolved", "parent math-en", "parent lang-x", "parent compare-en"}
    report = _cli("report", tmp_path / "exp")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "exp" / "recipe.png").stat().st_size > 0
    export = _cli("export", tmp_path / "exp", tmp_path / "out")
    assert export.returncode == 0, export.stderr
    best = json.loads(
        db.execute(
            "SELECT recipe FROM candidates WHERE status='ok' ORDER BY fitness DESC, id LIMIT 1"
        ).fetchone()[0]
    )
    assert any(scale != 1.0 for scale in best["scales"])  # so the stored scales matter below
    _export_matches_live(tmp_path / "out", [REPO / "zoo" / n for n in names], best)
    assert "| hop | source | layer | scale |" in (tmp_path / "out" / "README.md").read_text()
    # any candidate, its ends included: the one with other ends than model A's
    other = _exported_recipe(tmp_path / "exp", tmp_path / "other", lambda r: r.get("ends", [0, 0]) != [0, 0])
    _export_matches_live(tmp_path / "other", [REPO / "zoo" / n for n in names], other)
    ends = other["ends"]
    card = (tmp_path / "other" / "README.md").read_text()
    assert f"embeddings from {names[ends[0]]}; final norm and lm_head from {names[ends[1]]}" in card


def _exported_recipe(exp, out, wanted):
    """Export the best-ranked successful candidate whose recipe is `wanted`; returns its recipe."""
    from evomerge.results import ExperimentView

    ranked = ExperimentView.load(exp).ranked()
    rank, recipe = next((i + 1, c.recipe) for i, c in enumerate(ranked) if wanted(c.recipe))
    done = _cli("export", exp, out, "--rank", rank)
    assert done.returncode == 0, done.stderr
    return recipe


def _export_matches_live(out, source_dirs, recipe):
    """The exported model (through evomerge.load_model, scales applied) computes what the in-memory
    path model of `recipe` computed: same logits, same greedy generation."""
    import evomerge

    exported = evomerge.load_model(out, dtype=torch.float32).eval()
    assert exported.config.num_hidden_layers == len(recipe["path"])
    sources = [_load(d) for d in source_dirs]
    live = path_model(
        sources, [tuple(p) for p in recipe["path"]], recipe["scales"], tuple(recipe.get("ends", (0, 0)))
    )
    with torch.no_grad():
        assert torch.allclose(exported(IDS).logits, live(IDS).logits, atol=1e-5)
    assert torch.equal(_greedy(exported), _greedy(live))


# -- PS + DFS stages --------------------------------------------------------------------------------


def test_stage_config_errors():
    from evomerge.config import parse_config
    from evomerge.errors import UserError

    base = {
        "models": {"base": "b", "sources": ["s1", "s2"]},
        "evaluation": {"tasks": [{"name": "zoo_math_x"}]},
        "output": {"dir": "x"},
    }
    with pytest.raises(UserError, match="the first stage has no 'previous' stage"):
        parse_config({**base, "stages": [{"name": "a", "sources": ["previous", "s2"]}]})
    with pytest.raises(UserError, match="two stages have the same name"):
        parse_config({**base, "stages": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(UserError, match=r"stages\[1\]\.dfs\.repeats: Input should be greater"):
        parse_config({**base, "stages": [{"name": "a"}, {"name": "b", "dfs": {"repeats": 0}}]})
    with pytest.raises(UserError, match=r"stages\[1\] \(b\): .*slerp merges models.base with exactly one"):
        parse_config({**base, "stages": [{"name": "a"}, {"name": "b", "merge": {"method": "slerp"}}]})


@pytest.mark.slow
def test_ps_then_dfs_stages_resume_and_report(tmp_path):

    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "smoke-stages.yaml").read_text())
    cfg["models"] = {
        "base": str(REPO / "zoo" / "base"),
        "sources": [str(REPO / "zoo" / n) for n in ("math-en", "lang-x")],
    }
    cfg["stages"][1]["sources"] = ["previous", str(REPO / "zoo" / "lang-x"), str(REPO / "zoo" / "compare-en")]
    cfg["output"]["dir"] = str(tmp_path / "exp")
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def journal(stage):
        db = sqlite3.connect(tmp_path / "exp" / stage / "experiment.sqlite")
        rows = db.execute("SELECT generation, idx, genome, fitness FROM candidates ORDER BY id").fetchall()
        config = json.loads(db.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0])
        return rows, config

    done = _cli("search", path)
    assert done.returncode == 0, done.stderr
    ps, ps_config = journal("ps")
    dfs, dfs_config = journal("dfs")
    assert len(ps) == 12 and len(dfs) == 12 and ps_config["merge"]["method"] == "dare_ties"
    best_model = tmp_path / "exp" / "ps" / "ps-best"
    assert (
        dfs_config["models"]["sources"][0] == str(best_model.resolve()) and dfs_config["dfs"]["repeats"] == 2
    )
    assert dfs_config["dfs"]["ends"] == {"embeddings": "search", "head": "search"}
    assert dfs_config["evaluation"]["fidelity"]["mode"] == "subsample"  # cheap fitness in every stage
    recipes = [json.loads(r[0]) for r in sqlite3.connect(tmp_path / "exp" / "dfs" / "experiment.sqlite").execute(
        "SELECT recipe FROM candidates")]  # fmt: skip
    assert {s for r in recipes for s, _ in r["path"]} == {0, 1, 2}
    assert (best_model / "model.safetensors").is_file()
    # model A of the DFS stage is the PS winner: its identity path scores what the PS winner scored
    db = sqlite3.connect(tmp_path / "exp" / "dfs" / "experiment.sqlite")
    parent = db.execute("SELECT fitness FROM finals WHERE name='parent ps-best'").fetchone()[0]
    db = sqlite3.connect(tmp_path / "exp" / "ps" / "experiment.sqlite")
    assert parent == pytest.approx(
        db.execute("SELECT fitness FROM finals WHERE name='evolved'").fetchone()[0], abs=0.05
    )
    again = _cli("search", path)  # finished: resumes both stages, evaluates nothing
    assert again.returncode == 0, again.stderr
    assert journal("ps")[0] == ps and journal("dfs")[0] == dfs
    report = _cli("report", tmp_path / "exp")
    assert report.returncode == 0, report.stderr
    assert (
        "smoke-stages/ps" in report.stdout
        and "smoke-stages/dfs" in report.stdout
        and "all experiments" in report.stdout
    )
    assert _cli("search", path, "--fresh").returncode == 2
