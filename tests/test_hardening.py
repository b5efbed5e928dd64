"""Hardening round 3 (issue 23): the newer features under bad input, faults and other people's files.
Each test failed on the code before its fix. Real files, real safetensors, real CLI where the exit code
and the one line are the point; in-process calls where the behaviour is."""

import json
import os
import re
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, cli, smoke
from safetensors.torch import load_file, save_file

from evomerge.errors import UserError

ZOO = REPO / "zoo"


def _one_line_error(done, *needles):
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _merge_config(tmp_path: Path, zoo, method="ties", models=None, **extra) -> Path:
    base, ft1, ft2 = zoo["llama"]
    cfg = {
        "models": models
        or [
            {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "merge_method": method,
        "dtype": "float32",
        **extra,
    }
    if method != "linear":
        cfg.setdefault("base_model", str(base))
    path = tmp_path / f"merge-{len(list(tmp_path.glob('merge-*.yml')))}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _merge(config: Path, out: Path, **kw):
    from evomerge.merge.offline import merge_from_config

    return merge_from_config(config, out, **kw)


# -- writing models --------------------------------------------------------------------------------------


def test_one_stored_tensor_under_two_names_is_written_as_two(tmp_path):
    """A DFS path that repeats a layer exports the same stored tensor twice (at the stored dtype the
    checkpoint hands out the same memory-mapped storage): safetensors refused the shard."""
    from evomerge.models.checkpoint import Checkpoint
    from evomerge.models.writer import ShardWriter

    ckpt = Checkpoint.open(ZOO / "math-en")
    name = "model.layers.1.mlp.up_proj.weight"
    first, second = ckpt.get(name), ckpt.get(name)
    writer = ShardWriter(tmp_path)
    writer.add("model.layers.1.mlp.up_proj.weight", first)
    writer.add("model.layers.2.mlp.up_proj.weight", second)
    writer.finish()
    written = load_file(tmp_path / "model.safetensors")
    assert torch.equal(
        written["model.layers.1.mlp.up_proj.weight"], written["model.layers.2.mlp.up_proj.weight"]
    )


def _nan_source(tmp_path: Path, zoo) -> Path:
    bad = tmp_path / "nan-model"
    shutil.copytree(zoo["llama"][1], bad)
    tensors = load_file(bad / "model.safetensors")
    name = next(n for n in tensors if "layers.0.mlp" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def test_non_finite_merges_are_refused_and_write_nothing(tmp_path, zoo):
    base, ft1, ft2 = zoo["llama"]
    cases = {
        "multislerp weights 1 and -1": (
            {"method": "multislerp", "models": [{"model": str(ft1), "parameters": {"weight": 1.0}},
                                                {"model": str(ft2), "parameters": {"weight": -1.0}}]},
            "sum to 0",
        ),
        "ties lambda 1e30 into float16": (
            {"method": "ties", "parameters": {"lambda": 1e30}, "dtype": "float16"}, "not finite"),
        "ramplus_tl r 1e300": ({"method": "ramplus_tl", "parameters": {"r": 1e300},
                                "models": [{"model": str(ft1)}, {"model": str(ft2)}]}, "not finite"),
        "a NaN in a source": ({"method": "linear", "models": [
            {"model": str(_nan_source(tmp_path, zoo)), "parameters": {"weight": 0.5}},
            {"model": str(ft2), "parameters": {"weight": 0.5}}]}, "not finite"),
    }  # fmt: skip
    for case, (changes, needle) in cases.items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        with pytest.raises(UserError, match=needle) as err:
            _merge(_merge_config(tmp_path, zoo, **changes), out)
        assert "\n" not in str(err.value), case
        if needle == "not finite":
            assert (
                "model.layers." in str(err.value) or "embed" in str(err.value) or "lm_head" in str(err.value)
            )
        assert not out.exists(), case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")], case


def test_search_journals_a_non_finite_merge_as_failed(zoo):
    """The worker's candidate: a merged tensor with NaN is a failed candidate, not a score."""
    from evomerge.merge.engine import MergeEngine
    from evomerge.merge.methods import Method
    from evomerge.models.checkpoint import Checkpoint
    from evomerge.models.loading import load_target

    base, ft1, ft2 = (Checkpoint.open(p) for p in zoo["llama"])
    target = load_target(ft1)
    engine = MergeEngine(base, [ft1, ft2], Method.linear, target)
    names = engine.names
    good = {n: {"weight": (0.5, 0.5), "normalize": True} for n in names}
    engine.apply(good)
    assert engine.non_finite() is None
    bad = dict(good)
    bad[names[3]] = {"weight": (float("inf"), 0.5), "normalize": False}
    engine.apply(bad)
    assert engine.non_finite() == names[3]


# -- configs ---------------------------------------------------------------------------------------------


def test_yaml_alias_bombs_are_refused(tmp_path):
    from evomerge.strict_yaml import load_yaml

    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 8):  # 10^8 values once expanded, from under 1 KB
        prev = chr(ord("a") + level - 1)
        bomb.append(f"{chr(ord('a') + level)}: &{chr(ord('a') + level)} [{', '.join(['*' + prev] * 10)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(bomb) + "\n")
    assert path.stat().st_size < 1024
    with pytest.raises(UserError, match="expand to more than"):
        load_yaml(path)
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(UserError, match="recursive|not valid YAML"):
        load_yaml(path)
    path.write_text("base: &b {weight: 0.5, density: 0.5}\nother: {<<: *b, t: 0.3}\nlist: [*b, *b]\n")
    assert load_yaml(path)["other"] == {
        "weight": 0.5,
        "density": 0.5,
        "t": 0.3,
    }  # ordinary anchors still work


def test_alias_bomb_in_gen_kwargs_is_one_line_and_creates_nothing(tmp_path):
    cfg = smoke(tmp_path)
    text = cfg.read_text()
    lines = ["x0: &x0 [a, a, a, a, a, a, a, a, a, a]"]
    lines += [f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]" for i in range(1, 7)]
    bomb = "\n".join(f"# {line}" for line in lines)  # placed into gen_kwargs below
    data = yaml.safe_load(text)
    data["evaluation"]["tasks"][0]["gen_kwargs"] = {"until": "PLACEHOLDER"}
    text = yaml.safe_dump(data).replace("PLACEHOLDER", "*x6")
    cfg.write_text(
        bomb.replace("# ", "").replace("x0:", "_bomb:\n  x0:", 1).replace("\nx", "\n  x") + "\n" + text
    )
    done = cli("validate", cfg)
    _one_line_error(done, "expand to more than")
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"optimizer": {"name": "cma", "popsize": 100_000_000, "budget": 24}}, "more than the budget"),
        ({"optimizer": {"name": "random", "batch": 50, "budget": 24}}, "more than the budget"),
        ({"evaluation.split": {"heldout": 1.0}}, "write the integer 1"),
        ({"evaluation.split": {"heldout": 300.0}}, "write the integer 300"),
        ({"evaluation.split": {"heldout": 1.5}}, "a fraction must be in (0, 1)"),
    ],
)
def test_config_bounds_are_one_line(tmp_path, changes, needle):
    from evomerge.config import parse_config

    data = yaml.safe_load(smoke(tmp_path, **changes).read_text())
    with pytest.raises(UserError) as err:
        parse_config(data)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_round_memory_is_bounded_in_validate(tmp_path):
    """A round size within a huge budget can still not fit in memory: validate says so before a search
    allocates it."""
    from evomerge.validate import validate_config

    cfg = smoke(tmp_path, **{"optimizer": {"name": "cma", "popsize": 10**9, "budget": 10**10}})
    with pytest.raises(UserError, match="host memory for the optimizer"):
        validate_config(cfg)
    assert not (tmp_path / "exp").exists()


def test_small_heldout_split_warns(tmp_path):
    from evomerge.validate import validate_config

    task = {"name": "zoo_math_x", "metric": "exact_match,strict-match"}
    report = validate_config(
        smoke(tmp_path, **{"evaluation.split": {"heldout": 12}, "evaluation.tasks": [task]})
    )
    assert any(
        line.startswith("warning: task zoo_math_x has only 12 held-out items") for line in report.lines
    )
    report = validate_config(
        smoke(tmp_path, **{"evaluation.split": {"heldout": 300}, "evaluation.tasks": [task]})
    )
    assert not any(line.startswith("warning") for line in report.lines)
    report = validate_config(smoke(tmp_path))  # limit: 24 caps the held-out items the finals score
    assert any(
        line.startswith("warning: task zoo_math_x has only 24 held-out items") for line in report.lines
    )


def test_eval_heldout_option_is_parsed_like_the_config():
    for value, needle in (("inf", "a fraction must be in (0, 1)"), ("1.5", "a fraction must be in (0, 1)"),
                          ("lots", "must be a fraction")):  # fmt: skip
        done = cli("eval", ZOO / "math-en", "--task", "zoo_math_x", "--heldout", value)
        _one_line_error(done, "--heldout", needle)


# -- other people's model directories ---------------------------------------------------------------------


def _model_copy(tmp_path: Path, name: str = "math-en") -> Path:
    dest = tmp_path / f"{name}-copy-{len(list(tmp_path.glob(f'{name}-copy-*')))}"
    shutil.copytree(ZOO / name, dest)
    return dest


MALFORMED = {
    "config.json is a list": ("config.json", b"[]", "config.json holds a JSON list"),
    "num_hidden_layers a word": ("config.json", None, "num_hidden_layers must be a whole number"),
    "num_hidden_layers null": ("config.json", None, "num_hidden_layers must be a whole number"),
    "config.json not UTF-8": ("config.json", b'{"a": "\xff\xfe"}', "not UTF-8"),
    "index is a list": ("model.safetensors.index.json", b"[]", "is malformed"),
    "weight_map a list": ("model.safetensors.index.json", b'{"weight_map": []}', "is malformed"),
    "weight_map value 5": ("model.safetensors.index.json", b'{"weight_map": {"x": 5}}', "is malformed"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_model_metadata_is_one_line(tmp_path, case):
    from evomerge.models.checkpoint import Checkpoint

    model = _model_copy(tmp_path)
    name, data, needle = MALFORMED[case]
    if data is None:
        config = json.loads((model / "config.json").read_text())
        config["num_hidden_layers"] = "four" if "word" in case else None
        data = json.dumps(config).encode()
    (model / name).write_bytes(data)
    with pytest.raises(UserError) as err:
        Checkpoint.open(model)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    if case == "num_hidden_layers a word":  # and through the CLI: validate and merge, one line each
        cfg = smoke(tmp_path, **{"models.sources": [str(model), str(ZOO / "lang-x")]})
        _one_line_error(cli("validate", cfg), needle)


def test_declared_layers_must_all_be_stored(tmp_path):
    from evomerge.models.checkpoint import Checkpoint
    from evomerge.models.compat import check_compatible

    model = _model_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    stored = config["num_hidden_layers"]
    config["num_hidden_layers"] += 4
    (model / "config.json").write_text(json.dumps(config))
    lack = f"declares {stored + 4} layers but the weights lack model.layers.{stored}."
    with pytest.raises(UserError, match=lack):
        check_compatible([Checkpoint.open(model)])
    config["num_hidden_layers"] = 3
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="declares 3 layers but the weights also hold layer 3"):
        check_compatible([Checkpoint.open(model)])
    tensors = load_file(ZOO / "math-en" / "model.safetensors")
    config["num_hidden_layers"] = stored
    (model / "config.json").write_text(json.dumps(config))
    del tensors["model.layers.2.mlp.gate_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lack model\.layers\.2\.mlp\.gate_proj\.weight"):
        check_compatible([Checkpoint.open(model)])


def test_a_bin_beside_an_unusual_safetensors_name_is_ambiguous(tmp_path):
    from evomerge.models.checkpoint import Checkpoint

    model = _model_copy(tmp_path)
    (model / "model.safetensors").rename(model / "weights.safetensors")
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
    with pytest.raises(UserError, match="which transformers would load instead"):
        Checkpoint.open(model, allow_pickle=True)
    (model / "pytorch_model.bin").unlink()
    assert "model.embed_tokens.weight" in Checkpoint.open(model).tensors  # alone, the odd name is used


def test_tokenizer_links_out_of_the_model_dir_are_not_copied_and_outputs_follow_the_umask(tmp_path, zoo):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    secret.chmod(0o600)
    base, ft1, ft2 = zoo["llama"]
    linked = tmp_path / "linked-base"
    shutil.copytree(base, linked)
    (linked / "merges.txt").symlink_to(secret)
    (linked / "vocab.json").symlink_to(linked / "config.json")  # a link inside the dir is fine
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        _merge(_merge_config(tmp_path, zoo, base_model=str(linked)), out)
    finally:
        os.umask(old)
    assert not (out / "merges.txt").exists()
    assert (out / "vocab.json").read_bytes() == (linked / "config.json").read_bytes()
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_two_spellings_of_one_model_dir_are_one_model(tmp_path, zoo):
    base, ft1, ft2 = zoo["llama"]
    models = [{"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.5}},
              {"model": str(ft1) + "/", "parameters": {"weight": 0.5, "density": 0.5}}]  # fmt: skip
    with pytest.raises(UserError, match="are the same model"):
        _merge(_merge_config(tmp_path, zoo, models=models), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- what an experiment recorded of its models --------------------------------------------------------------


def _meta(exp: Path, key: str, value=None):
    db = sqlite3.connect(exp / "experiment.sqlite")
    try:
        if value is not None:
            db.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(value), key))
            db.commit()
        return json.loads(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])
    finally:
        db.close()


def _swap_two_tokens(model: Path) -> None:
    data = json.loads((model / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[5], list(vocab)[6]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (model / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.slow
def test_export_and_resume_use_what_the_experiment_recorded(tmp_path):
    """Relative model paths resolve where the search resolved them, whatever the working directory is at
    export; export refuses weights or tokenizers that changed since; resume refuses a changed tokenizer
    and accepts a journal older than tokenizer records with one line."""
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    for root, names in ((home, ("base", "math-en", "lang-x")), (elsewhere, ("base", "lang-x"))):
        for name in names:
            shutil.copytree(ZOO / name, root / "models" / name)
    shutil.copytree(ZOO / "lang-x", elsewhere / "models" / "math-en")  # same name, other weights
    cfg = smoke(tmp_path, **{"optimizer.budget": 6, "models": {
        "base": "models/base", "sources": ["models/math-en", "models/lang-x"]}})  # fmt: skip
    exp = tmp_path / "exp"
    done = cli("search", cfg, cwd=home)
    assert done.returncode == 0, done.stderr
    assert "tokenizer" in _meta(exp, "models")["sources"][0]

    assert cli("export", exp, tmp_path / "from-home", cwd=home).returncode == 0
    done = cli("export", exp, tmp_path / "from-elsewhere", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "from-home" / "model.safetensors").read_bytes() == (
        tmp_path / "from-elsewhere" / "model.safetensors"
    ).read_bytes()

    _swap_two_tokens(home / "models" / "math-en")
    _one_line_error(cli("search", cfg, cwd=home), "models.sources[0]", "its tokenizer files differ")
    _one_line_error(cli("export", exp, tmp_path / "x", cwd=home), "its tokenizer files differ")
    assert not (tmp_path / "x").exists()
    shutil.copy(ZOO / "math-en" / "tokenizer.json", home / "models" / "math-en" / "tokenizer.json")

    shutil.copy(ZOO / "lang-x" / "model.safetensors", home / "models" / "math-en" / "model.safetensors")
    _one_line_error(cli("export", exp, tmp_path / "x", cwd=home), "config or weight files differ")
    shutil.copy(ZOO / "math-en" / "model.safetensors", home / "models" / "math-en" / "model.safetensors")

    models = _meta(exp, "models")  # as an older evomerge recorded them: no tokenizer
    for record in [models["base"], *models["sources"]]:
        del record["tokenizer"]
    _meta(exp, "models", models)
    done = cli("search", cfg, cwd=home)
    assert done.returncode == 0, done.stderr
    assert "its tokenizer was not recorded" in done.stdout + done.stderr
    assert "tokenizer" in _meta(exp, "models")["sources"][0]


@pytest.mark.slow
def test_stage_hand_off_follows_the_stage_best(tmp_path):
    """A stage whose best changes after it was handed on (a longer run found a better recipe) is exported
    again; the later stage that ran on the old best is kept aside and starts over on the new one."""
    from evomerge.files import marker
    from evomerge.store import ExperimentStore

    cfg = yaml.safe_load((REPO / "configs" / "smoke-stages.yaml").read_text())
    cfg["models"] = {"base": str(ZOO / "base"), "sources": [str(ZOO / n) for n in ("math-en", "lang-x")]}
    cfg["stages"][1]["sources"] = ["previous", str(ZOO / "lang-x")]
    del cfg["evaluation"]["fidelity"]  # full fitness: the journaled fitness below is what ranks the stage
    for stage in cfg["stages"]:
        stage["optimizer"]["budget"] = 6
    cfg["output"]["dir"] = str(tmp_path / "exp")
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exp = tmp_path / "exp"
    assert cli("search", path).returncode == 0
    handoff = exp / "ps" / "ps-best"
    store = ExperimentStore.open(exp / "ps")
    first = store.winner()
    assert marker(handoff)["candidate"] == first.id
    # a better recipe lands in stage ps (as a run extended with --budget would journal one)
    worst = min((c for c in store.candidates() if c.ok), key=lambda c: c.fitness)
    worst.id, worst.generation, worst.fitness = None, 99, 2.0
    new_id = store.record(worst)
    store.close()
    done = cli("search", path)
    assert done.returncode == 0, done.stderr
    assert marker(handoff)["candidate"] == new_id
    aside = exp / f"dfs.on-ps-candidate-{first.id}"
    assert ExperimentStore.exists(aside) and ExperimentStore.exists(exp / "dfs")
    log = (exp / "ps" / "search.log").read_text()
    assert f"stage ps's best is now candidate {new_id} (was {first.id}): exporting it again" in log
    assert "kept as dfs.on-ps-candidate" in log
    exported = load_file(handoff / "model.safetensors")
    again = tmp_path / "again"
    assert cli("export", exp / "ps", again).returncode == 0
    assert all(torch.equal(exported[k], v) for k, v in load_file(again / "model.safetensors").items())


@pytest.mark.slow
def test_two_searches_started_together_on_a_new_directory(tmp_path):
    """The one that loses says the experiment is in use and by whom (it used to call the winner's new
    experiment 'not an experiment'); the winner's journal is untouched."""
    import subprocess
    import sys
    import time

    cfg = smoke(tmp_path, **{"optimizer.budget": 60})
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "evomerge.cli", "search", str(cfg)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.stderr.read()
        assert loser.returncode == 2, err
        assert "in use by another evomerge search" in err and f"pid {winner.pid} on " in err, err
        assert len(err.strip().splitlines()) == 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(2)
                p.wait(timeout=60)
    assert (tmp_path / "exp" / "experiment.sqlite").exists()


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"space.t": {"min": 0.1, "max": 0.9}}, "space.t: not a searchable parameter of dare_ties"),
        ({"merge.method": "linear", "models.base": None, "space.density": {"min": 0.2, "max": 1.0}},
         "space.density: not a searchable parameter of linear"),
    ],
)  # fmt: skip
def test_bounds_for_genes_the_method_lacks_are_refused(tmp_path, changes, needle):
    from evomerge.config import load_config

    with pytest.raises(UserError, match=re.escape(needle)):
        load_config(smoke(tmp_path, **changes))
    load_config(smoke(tmp_path, **{"space.density": {"min": 0.2, "max": 1.0}}))  # ties has density


@pytest.mark.parametrize(
    "gen_kwargs,needle",
    [
        ({"max_new_token": 8}, "unknown generation option 'max_new_token'; did you mean max_new_tokens?"),
        ({"until": 5}, "until must be a string or a list of strings"),
        ({"max_gen_toks": "many"}, "max_gen_toks must be a whole number"),
        ({"do_sample": "yes"}, "do_sample must be true or false"),
        ({"temperature": -1}, "temperature must be a finite number"),
    ],
)
def test_gen_kwargs_are_checked_before_anything_exists(tmp_path, gen_kwargs, needle):
    from evomerge.experiment import run_search

    task = {"name": "zoo_math_x", "metric": "exact_match,strict-match", "limit": 24, "gen_kwargs": gen_kwargs}
    cfg = smoke(tmp_path, **{"evaluation.tasks": [task]})
    with pytest.raises(UserError) as err:
        run_search(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "exp").exists()
    task["gen_kwargs"] = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    from evomerge.validate import validate_config

    validate_config(smoke(tmp_path, **{"evaluation.tasks": [task]}))


# -- the journal ------------------------------------------------------------------------------------------


@pytest.fixture
def finished(finished_smoke):
    return finished_smoke


DAMAGE = {
    "genome not JSON": "UPDATE candidates SET genome = 'not json' WHERE id = 2",
    "recipe a list": "UPDATE candidates SET recipe = '[]' WHERE id = 1",
    "metrics not JSON": "UPDATE candidates SET metrics = '{' WHERE id = 3",
    "fitness text": "UPDATE candidates SET fitness = 'abc' WHERE id = 1",
    "status unknown": "UPDATE candidates SET status = 'weird' WHERE id = 1",
    "generation text": "UPDATE candidates SET generation = 'x' WHERE id = 4",
    "recipe edited": "UPDATE candidates SET recipe = replace(recipe, '0.', '0.9') WHERE id = 1",
    "fitness edited": "UPDATE candidates SET fitness = fitness + 0.5 WHERE id = 5",
    "checksum removed": "UPDATE candidates SET checksum = NULL WHERE id = 2",
    "final metrics not JSON": "UPDATE finals SET metrics = '{'",
    "final recipe not JSON": "UPDATE finals SET recipe = '{' WHERE kind = 'evolved'",
    "items text": "UPDATE items SET vals = 'abc'",
    "meta config not JSON": "UPDATE meta SET value = '{' WHERE key = 'config'",
    "meta models a list": "UPDATE meta SET value = '[1]' WHERE key = 'models'",
    "meta identity a list": "UPDATE meta SET value = '[1]' WHERE key = 'identity'",
}


def _damaged(exp: Path, dest: Path, how: str) -> Path:
    shutil.copytree(exp, dest)
    if how in DAMAGE:
        db = sqlite3.connect(dest / "experiment.sqlite")
        db.execute("PRAGMA ignore_check_constraints = 1")
        db.execute(DAMAGE[how])
        db.commit()
        db.close()
    else:  # bytes of the file itself
        file = dest / "experiment.sqlite"
        data = bytearray(file.read_bytes())
        if how == "truncated":
            data = data[: len(data) // 2 + 100]
        else:
            data[4096 : 4096 + 2048] = os.urandom(2048)
        file.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("how", [*DAMAGE, "truncated", "garbage page"])
def test_journal_damage_is_one_line_everywhere(finished, tmp_path, how):
    """report, export and search (resume) on a damaged journal: each works or refuses with one UserError;
    an edited row is refused (never resumed or exported), never a traceback."""
    from evomerge.experiment import run_search
    from evomerge.export import export_candidate
    from evomerge.report.render import write_report
    from evomerge.results import ExperimentView

    cfg, exp = finished
    damaged = _damaged(exp, tmp_path / "exp", how)
    outcomes = {}

    def attempt(name, fn):
        try:
            fn()
            outcomes[name] = "ok"
        except UserError as exc:
            assert "\n" not in str(exc)
            outcomes[name] = str(exc)

    attempt("report", lambda: write_report(ExperimentView.load(damaged), tmp_path / "report"))
    attempt("export", lambda: export_candidate(damaged, tmp_path / "model"))
    attempt("search", lambda: run_search(cfg, out=damaged))
    if how in ("recipe edited", "fitness edited", "checksum removed"):
        assert all("was changed after it was written" in v for v in outcomes.values()), outcomes
        assert not (tmp_path / "model").exists()


# -- reports and the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["subsample", "anchors"])
def test_estimates_are_marked_everywhere(fidelity_runs, tmp_path, mode):
    """Per-task cells of an estimated candidate carry `~` like its fitness (report, CSV, model card);
    re-scored ones show the full score first; anchors show what the anchors measured."""
    import csv

    from evomerge.export import model_card
    from evomerge.merge.recipe import parse_recipe
    from evomerge.report.render import top_rows, write_report
    from evomerge.results import ExperimentView

    _, exp, _ = fidelity_runs(mode)
    view = ExperimentView.load(exp)
    header, rows = top_rows(view, n=len(view.candidates))
    task_col = header.index("zoo_math_x")
    for row in rows:
        fitness, cell = row[3], row[task_col]
        assert cell, row  # anchors used to leave these blank
        assert fitness.startswith("~") == cell.startswith("~"), row
        assert ("(estimate ~" in fitness) == ("(estimate ~" in cell), row
        if mode == "anchors" and "~" in cell:
            assert "(anchors " in cell
    write_report(view, tmp_path / "r")
    with open(tmp_path / "r" / "leaderboard.csv") as handle:
        for record in csv.DictReader(handle):
            value = record["zoo_math_x"]
            if record["status"] == "ok":
                full = record["full_split_fitness"] != ""
                assert value.startswith("~") != full, record
    best = view.ranked()[0]
    card = model_card(view, best, 1, parse_recipe(best.recipe))
    line = next(ln for ln in card.splitlines() if ln.startswith("| zoo_math_x |"))
    assert line.split("|")[2].strip() == top_rows(view, 1)[1][0][task_col]


def test_csv_cells_cannot_be_formulas_and_html_has_no_empty_header(finished, tmp_path):
    import csv

    from evomerge.report.render import csv_text, write_report
    from evomerge.results import ExperimentView

    assert (
        csv_text("=HYPERLINK(1)") == "'=HYPERLINK(1)" and csv_text("@x") == "'@x" and csv_text(-1.5) == -1.5
    )
    assert csv_text("ok name") == "ok name"
    _, exp = finished
    view = ExperimentView.load(exp)
    view.config["evaluation"]["tasks"][0]["name"] = "=cmd|'/c calc'!A1"
    view.candidates[0].metrics = {"=cmd|'/c calc'!A1": view.candidates[0].metrics.get("zoo_math_x", {})}
    view.candidates[1].status, view.candidates[1].reason = "failed", "+1 merge: -boom"
    write_report(view, tmp_path / "r")
    with open(tmp_path / "r" / "leaderboard.csv") as handle:
        rows = list(csv.reader(handle))
    assert "'=cmd|'/c calc'!A1" in rows[0]
    assert all(not cell.startswith(("=", "+", "@")) for row in rows for cell in row)
    assert "'+1 merge: -boom" in [cell for row in rows for cell in row]
    page = (tmp_path / "r" / "report.html").read_text()
    assert "<th></th>" not in page


def test_report_at_80_columns_keeps_names_whole(finished, tmp_path):
    _, exp = finished
    done = cli("report", exp, "--out", tmp_path / "r", env_extra={"COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line[:1] in "┏┃┡│└┗╇╷╵━"]
    assert table and max(len(line) for line in table) <= 80
    assert all(line[-1] in "┓┃┩│┘" for line in table)  # whole tables: none cropped at the right edge
    words = {w for line in done.stdout.splitlines() for w in line.replace("│", " ").replace("┃", " ").split()}
    for name in ("task_arithmetic", "dare_ties", "math-en", "lang-x", "evolved"):
        assert name in words, (name, done.stdout)


def test_small_heldout_split_is_warned_in_the_report(finished):
    from evomerge.report.render import summary_rows
    from evomerge.results import ExperimentView
    from evomerge.store import ItemResults

    _, exp = finished
    view = ExperimentView.load(exp)  # the smoke search scores 24 held-out items (limit: 24)
    assert [r[1][:39] for r in summary_rows(view) if r[0] == "warning"] == [
        "task zoo_math_x has only 24 held-out it"
    ]
    view.final_items = {
        name: {t: ItemResults(r.metric, r.ids[:12], r.values[:12]) for t, r in items.items()}
        for name, items in view.final_items.items()
    }
    assert [r[1] for r in summary_rows(view) if r[0] == "warning"] == [
        "task zoo_math_x has only 12 held-out items: too few to tell the finalists apart "
        "(aim for at least 30; evaluation.split.heldout)"
    ]


def test_cli_options_and_report_targets_are_one_line(finished, tmp_path):
    _, exp = finished
    _one_line_error(cli("search", REPO / "configs" / "smoke.yaml", "--budget", "lots"), "--budget", "integer")
    _one_line_error(cli("search"), "Missing argument")
    (tmp_path / "file").write_text("x")
    _one_line_error(cli("report", exp, "--out", tmp_path / "file"), "is not a directory")
    (tmp_path / "r" / "leaderboard.md").mkdir(parents=True)
    _one_line_error(cli("report", exp, "--out", tmp_path / "r"), "leaderboard.md is a directory")
    assert not (tmp_path / "r" / "report.html").exists()


def test_nevergrad_trial_warnings_stay_quiet(tmp_path):
    cfg = smoke(tmp_path, **{"optimizer": {"name": "nevergrad", "optimizer": "NGOpt", "budget": 12,
                                           "batch": 1, "overlap": 0}})  # fmt: skip
    done = cli("validate", cfg)
    _one_line_error(done, "helper thread")


def test_slices_rebuild_only_per_layer_keys(tmp_path, zoo):
    from evomerge.merge.slices import sliced_config

    config = {"num_hidden_layers": 3, "eos_token_id": [1, 2, 3], "layer_types": ["a", "b", "c"]}
    out = sliced_config(config, 2, [("m", 2), ("m", 0)], {"m": config})
    assert out["eos_token_id"] == [1, 2, 3] and out["layer_types"] == ["c", "a"]
    base, ft1, ft2 = zoo["qwen2"]
    model = tmp_path / "eos-list"
    shutil.copytree(ft1, model)
    data = json.loads((model / "config.json").read_text())
    data["eos_token_id"] = [0, 1, 2][: data["num_hidden_layers"]] + [0] * (data["num_hidden_layers"] - 3)
    (model / "config.json").write_text(json.dumps(data))
    cfg = tmp_path / "slices.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "passthrough", "dtype": "float32",
        "slices": [{"sources": [{"model": str(model), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(model), "layer_range": [1, 3]}]}],
    }))  # fmt: skip
    _merge(cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 4 and written["eos_token_id"] == data["eos_token_id"]


OLD = Path(__file__).resolve().parent / "data" / "experiment-aec93e7"
# the models it was made with (zoo v1, before the 8-layer zoo v2), where its journal's relative "zoo/base"
# finds them when evomerge runs in tests/data/zoo-v1
V1_DIR = OLD.parent / "zoo-v1"


@pytest.mark.slow
def test_an_experiment_from_before_this_round_reports_exports_and_resumes(tmp_path):
    """tests/data/experiment-aec93e7: a finished 6-evaluation smoke search written by the code before this
    round (no row checksums, no tokenizer records, made in another directory). It reports and exports as
    it is, and resumes with one line about the tokenizers; its old rows stay trusted, new rows are
    checksummed."""
    exp = tmp_path / "exp"
    shutil.copytree(OLD, exp)
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg.update(name="made-by-aec93e7", output={"dir": str(exp)})
    cfg["models"] = {"base": "zoo/base", "sources": ["zoo/math-en", "zoo/lang-x"]}
    cfg["space"]["layers_per_group"] = 2  # as smoke.yaml was for the 4-layer zoo v1
    cfg["optimizer"]["budget"] = 6
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = cli("report", exp, "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr
    assert "made-by-aec93e7: held-out" in done.stdout
    done = cli("export", exp, tmp_path / "model", cwd=V1_DIR)
    assert done.returncode == 0, done.stderr
    done = cli("search", path, "--budget", 8, cwd=V1_DIR)
    assert done.returncode == 0, done.stderr
    assert "its tokenizer was not recorded" in done.stdout
    db = sqlite3.connect(exp / "experiment.sqlite")
    sums = [r[0] for r in db.execute("SELECT checksum FROM candidates ORDER BY id")]
    db.close()
    assert sums[:6] == [None] * 6 and all(sums[6:]) and len(sums) == 8
    assert cli("export", exp, tmp_path / "model", "--force", cwd=V1_DIR).returncode == 0


# -- issue 24: runtime settings resolved once ----------------------------------------------------------------


def test_runtime_is_resolved_once_and_journaled(finished_smoke, tmp_path):
    """The journaled config holds concrete runtime values (what every worker was given); the old key
    runtime.sources still works, with one deprecation line; a worker refuses `auto` as a bug."""
    from evomerge.config import load_config
    from evomerge.runtime.plan import concrete
    from evomerge.store import ExperimentStore

    _, exp = finished_smoke
    store = ExperimentStore.open(exp, readonly=True)
    runtime = store.meta_json("config")["runtime"]
    store.close()
    assert runtime["device"] == "cpu" and runtime["placement"] == "device"
    assert runtime["pin_memory"] in ("on", "off") and runtime["dtype"] in ("float32", "bfloat16", "float16")
    cfg = smoke(tmp_path, **{"runtime.sources": "host"})
    config, _ = load_config(cfg)
    assert config.runtime.placement == "host"
    done = cli("validate", cfg)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "runtime.sources is now runtime.placement" in line]
    with pytest.raises(RuntimeError, match="unresolved"):
        concrete(config)


def test_the_old_experiment_reports_as_it_did_before_the_loop_was_rebuilt(tmp_path):
    """issue 24: `evomerge report` on tests/data/experiment-aec93e7 writes, to the character, the
    leaderboard.md and leaderboard.csv the code before the loop's rebuild (e591d7e) wrote, and prints the
    terminal tables as they were once uncropped column widths came in (stdout.txt; paths replaced)."""
    golden = OLD.parent / "experiment-aec93e7-report"
    exp = tmp_path / "exp"
    shutil.copytree(OLD, exp)
    done = cli("report", exp, "--out", tmp_path / "report", env_extra={"COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    for name in ("leaderboard.md", "leaderboard.csv"):
        assert (tmp_path / "report" / name).read_text().replace(str(exp), "<exp>") == (
            golden / name
        ).read_text()
    out = done.stdout.replace(str(tmp_path / "report"), "<out>").replace(str(exp), "<exp>")
    assert out == (golden / "stdout.txt").read_text()


def test_gene_ranges_come_from_the_method_records():
    """issue 24: one source of truth. An unset `space.<gene>` is the method's own range (Param.gene), also
    after a config snapshot is read back (the schema used to dump weight/density/t defaults, which then
    counted as set: nearswap's t would have been searched over [0, 1]); a set one is an override, and the
    identity of an unset range is what older schemas wrote, so their experiments resume."""
    from helpers import minimal_config

    from evomerge.config import ExperimentConfig, SpaceSpec
    from evomerge.merge.methods import Method

    t = Method.nearswap.spec.param("t")
    assert SpaceSpec().range(t) == t.gene == (0.0, 0.001)
    assert SpaceSpec.model_validate(SpaceSpec().model_dump(mode="json")).range(t) == t.gene
    assert SpaceSpec.model_validate({"t": {"min": 0.0, "max": 0.0005}}).range(t) == (0.0, 0.0005)
    identity = ExperimentConfig.model_validate(minimal_config()).identity()
    assert identity["space"]["weight"] == {"min": 0.0, "max": 1.0}
    assert identity["space"]["density"] == {"min": 0.1, "max": 1.0} and identity["space"]["t"] == {
        "min": 0.0,
        "max": 1.0,
    }
