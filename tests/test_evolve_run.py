"""Running a mergekit-evolve config (issue 28): translated at the door, searched over its genotype with
its meaning, and then an evomerge run like any other: journaled, resumable after kill -9, reportable,
exportable as mergekit-evolve's best_config.yaml; flags with no meaning said once each; bad input one
line, exit 2, nothing created."""

import sqlite3

import pytest
import yaml
from helpers import REPO, cli, evolve, journal, kill_and_resume

from evomerge.errors import UserError
from evomerge.migrate import parse_flags, translate

FULL = {
    "genome": {
        "models": ["org/math", "org/lang"], "merge_method": "dare_ties", "base_model": "org/base",
        "tokenizer_source": "base", "layer_granularity": 8, "normalize": False, "allow_negative_weights": True,
        "filters": ["self_attn", "mlp"], "smooth": True,
    },
    "tasks": ["task_a", {"name": "task_b", "weight": 0.5}, {"name": "task_c", "metric": "exact_match,none"}],
    "limit": 50, "num_fewshot": 3, "shuffle": True, "random_init": True,
    "apply_chat_template": True, "fewshot_as_multiturn": False,
}  # fmt: skip


def test_every_key_and_flag_of_a_mergekit_evolve_config_is_translated():
    args = ["--max-fevals", "40", "--sigma0=0.3", "--random-seed", "9", "--storage-path", "runs/x",
            "--batch-size", "16", "--force-population-size", "8", "--task-search-path", "tasks/a",
            "--task-search-path", "tasks/b", "--num-gpus", "4", "--vllm", "--no-in-memory"]  # fmt: skip
    data, notes = translate(FULL, "cfg/evolve.yml", parse_flags(args))
    assert data["models"] == {"base": "org/base", "sources": ["org/math", "org/lang"]}
    assert data["merge"] == {"method": "dare_ties"}
    assert data["mergekit_genome"] == {
        "layer_granularity": 8, "allow_negative_weights": True, "smooth": True, "normalize": False,
        "filters": ["self_attn", "mlp"], "tokenizer_source": "base", "random_init": True,
    }  # fmt: skip
    # negative weights search [-1, 1]: a box step of sigma0 / 2 is mergekit-evolve's sigma0 there
    assert data["space"] == {"weight": {"min": -1.0, "max": 1.0}}
    assert data["optimizer"] == {"name": "cma", "budget": 40, "seed": 9, "sigma0": 0.15, "popsize": 8}
    assert data["evaluation"] == {
        "tasks": [
            {"name": "task_a", "metric": "acc,none", "weight": 1.0, "num_fewshot": 3, "limit": 50},
            {"name": "task_b", "metric": "acc,none", "weight": 0.5, "num_fewshot": 3, "limit": 50},
            {"name": "task_c", "metric": "exact_match,none", "weight": 1.0, "num_fewshot": 3, "limit": 50},
        ],
        "chat_template": True, "fewshot_as_multiturn": False, "include_paths": ["tasks/a", "tasks/b"],
        "batch_size": 16,
    }  # fmt: skip
    assert data["runtime"] == {"dtype": "bfloat16", "executor": "ray", "ray": {"workers": 4}}
    assert data["output"] == {"dir": "runs/x"}
    assert len(notes) == 2 and notes[0].startswith("--vllm: ") and notes[1].startswith("shuffle: ")
    # mergekit-evolve's CLI defaults where no flag is given
    data, notes = translate({**FULL, "genome": {**FULL["genome"], "allow_negative_weights": False}}, "e.yml")
    assert data["optimizer"] == {"name": "cma", "budget": 100, "seed": 0, "sigma0": 1 / 6}
    assert data["output"] == {"dir": "e-evomerge"} and "space" not in data


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--timeout", "60"], "--timeout is not supported: evomerge stops at the budget"),
        (["--allow-crimes"], "--allow-crimes is not supported"),
        (["--trust-remote-code"], "--trust-remote-code is not supported"),
        (["--max-fevals", "x"], "--max-fevals: expected int, got 'x'"),
        (["--frobnicate"], "--frobnicate: not a mergekit-evolve flag"),
        (["--vllm=yes"], "--vllm takes no value"),
        (["--load-in-8bit", "--load-in-4bit"], "--load-in-8bit and --load-in-4bit cannot both be set"),
    ],
)
def test_flags_evomerge_cannot_honour_are_refused(args, needle):
    with pytest.raises(UserError, match=needle):
        translate(FULL, "e.yml", parse_flags(args))


@pytest.mark.parametrize(
    ("genome", "top", "needle"),
    [
        ({"merge_method": "della"}, {}, "merge_method: mergekit-evolve has no 'della'"),
        ({"layer_granularity": 3}, {}, "layer_granularity 3 does not divide the models' 8 layers"),
        ({"merge_method": "slerp", "smooth": True, "filters": None}, {}, "smooth is not supported for slerp"),
        ({}, {"tasks": ["no_such_task_anywhere"]}, "no_such_task_anywhere"),
        ({}, {"tasks": [{"name": "zoo_math_x", "metric": "acc,none"}]}, "acc,none"),
        ({}, {"generations": 5}, "generations: unknown key"),
        ({"merge_method": "linear"}, {}, "linear with a base_model that is not one of the genome's models"),
    ],
)
def test_bad_mergekit_evolve_configs_are_one_line_and_create_nothing(tmp_path, genome, top, needle):
    cfg = evolve(tmp_path, genome=genome, **top)
    out = tmp_path / "storage"
    done = cli("search", cfg, "--storage-path", out, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], done.stderr
    assert not out.exists()


def test_flags_with_no_meaning_here_are_said_once_each(tmp_path):
    done = cli("validate", evolve(tmp_path), "--vllm", "--in-memory", "--load-in-8bit", "--no-reshard",
               "--max-fevals", "6", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "evomerge.migrate" in line]
    assert [line.split(": ", 1)[1].split(":")[0] for line in said] == [
        "--vllm",
        "--in-memory",
        "--load-in-8bit",
    ]
    assert "mergekit-evolve genotype 2x2x2x2" in done.stdout and "budget 6" in done.stdout
    plain = cli("validate", REPO / "configs" / "smoke.yaml", "--vllm")
    assert plain.returncode == 2 and "--vllm: unknown option" in plain.stderr


@pytest.mark.slow
def test_a_migrated_run_is_an_evomerge_run(tmp_path):
    """Journaled as merge configs, resumed after kill -9 to the same journal, reported, exported with
    mergekit-evolve's best_config.yaml, which `evomerge merge` turns into the same weights; and the
    config `evomerge import` writes is the same experiment."""
    from safetensors.torch import load_file

    cfg = evolve(tmp_path)
    args = ("--max-fevals", "12")
    done = cli("search", cfg, "--out", tmp_path / "whole", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    killed_at = kill_and_resume(cfg, tmp_path / "killed", budget=12, seed=3, kills=2, args=args)
    assert len(killed_at) >= 3, killed_at
    whole = journal(tmp_path / "whole")
    assert journal(tmp_path / "killed") == whole and len(whole[0]) == 12
    assert {"evolved", "default ties", "parent math-en", "parent lang-x"} <= set(whole[1])

    db = sqlite3.connect(tmp_path / "whole" / "experiment.sqlite")
    recipes = [yaml.safe_load(r) for (r,) in db.execute("SELECT recipe FROM candidates ORDER BY id")]
    db.close()
    assert all(r["kind"] == "mergekit" and r["config"]["merge_method"] == "ties" for r in recipes)
    assert len(recipes[0]["config"]["slices"]) == 2  # 8 layers, genes per 4

    report = cli("report", tmp_path / "whole")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "whole" / "recipe.png").stat().st_size > 1000

    exported = cli("export", tmp_path / "whole", tmp_path / "model")
    assert exported.returncode == 0, exported.stderr
    best = yaml.safe_load((tmp_path / "model" / "best_config.yaml").read_text())
    from evomerge.results import ExperimentView

    winner = ExperimentView.load(tmp_path / "whole").ranked()[0]
    assert best == {k: v for k, v in winner.recipe["config"].items() if v is not None}
    assert set(best) == {"merge_method", "slices", "parameters", "dtype", "base_model"}
    rebuilt = cli("merge", tmp_path / "model" / "best_config.yaml", tmp_path / "rebuilt")
    assert rebuilt.returncode == 0, rebuilt.stderr
    a = load_file(tmp_path / "model" / "model.safetensors")
    b = load_file(tmp_path / "rebuilt" / "model.safetensors")
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)

    imported = cli("import", cfg, "-o", tmp_path / "sub" / "exp.yaml", *args, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    again = cli("search", tmp_path / "sub" / "exp.yaml", "--out", tmp_path / "imported", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert journal(tmp_path / "imported") == whole


@pytest.mark.slow
def test_slerp_over_three_models_picks_a_pair_per_layer_group(tmp_path):
    """mergekit-evolve's slerp: per layer group the two models with the highest weights, t the softmax;
    the search's pool engine merges whichever pair each slice names."""
    cfg = evolve(
        tmp_path,
        genome={"merge_method": "slerp", "base_model": None, "filters": None, "layer_granularity": 2,
                "models": [str(REPO / "zoo" / n) for n in ("math-en", "lang-x", "compare-en")]},
    )  # fmt: skip
    done = cli("search", cfg, "--out", tmp_path / "exp", "--max-fevals", "16", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    recipes = [yaml.safe_load(r) for (r,) in db.execute("SELECT recipe FROM candidates")]
    statuses = [s for (s,) in db.execute("SELECT status FROM candidates")]
    db.close()
    assert statuses == ["ok"] * 16
    pairs = {tuple(s["model"] for s in piece["sources"]) for r in recipes for piece in r["config"]["slices"]}
    assert len(pairs) >= 3  # different pairs (and orders) were merged
