"""The real `evomerge` command: a successful merge, and bad input -> one line, exit 2, nothing written."""

import math
import shutil

import pytest
import yaml
from helpers import cli as _run


def _config(tmp_path, zoo, **overrides):
    base, ft1, ft2 = zoo["llama"]
    cfg = {
        "models": [
            {"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "base_model": str(base),
        "merge_method": "ties",
        "dtype": "float32",
    }
    cfg.update(overrides)
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_succeeds_and_refuses_to_overwrite(tmp_path, zoo):
    out = tmp_path / "out"
    done = _run("merge", _config(tmp_path, zoo), out)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    again = _run("merge", _config(tmp_path, zoo), out)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert _run("merge", _config(tmp_path, zoo), out, "--force").returncode == 0


def _corrupt(tmp_path, zoo, how):
    bad = tmp_path / "bad-model"
    shutil.copytree(zoo["llama"][1], bad)
    file = bad / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" + data[8:])
    return bad


def _bad_configs(tmp_path, zoo):
    base, ft1, ft2 = zoo["llama"]
    other = tmp_path / "other"
    from evomerge.models.synthetic import make_family

    other = make_family(tmp_path, "llama", finetunes=0, hidden=48, layers=3)[0]
    models = lambda a, b, **p: [  # noqa: E731
        {"model": str(a), "parameters": {"weight": 0.5, **p}},
        {"model": str(b), "parameters": {"weight": 0.5, **p}},
    ]
    return {
        "missing model dir": ({"models": models(tmp_path / "nope", ft2)}, "model directory not found"),
        "truncated safetensors": ({"models": models(_corrupt(tmp_path, zoo, "truncated"), ft2)}, "safetensors"),
        "mismatched shapes": ({"models": models(other, ft2)}, "has shape"),
        "unknown method": ({"merge_method": "tiez"}, "unknown merge method 'tiez'"),
        "density out of range": ({"models": models(ft1, ft2, density=1.5)}, "density must be in (0, 1]"),
        "zero density": ({"models": models(ft1, ft2, density=0)}, "density must be in (0, 1]"),
        "nan weight": ({"models": [{"model": str(ft1), "parameters": {"weight": math.nan}},
                                   {"model": str(ft2), "parameters": {"weight": 0.5}}]}, "weight must be a finite"),
        "unknown key": ({"modelz": []}, "modelz"),
        "missing weight": ({"models": [{"model": str(ft1)}, {"model": str(ft2)}]}, "missing parameter weight"),
    }  # fmt: skip


@pytest.mark.slow
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, zoo):
    for case, (overrides, expected) in _bad_configs(tmp_path, zoo).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        done = _run("merge", _config(tmp_path, zoo, **overrides), out)
        assert done.returncode == 2, (case, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, done.stderr)
        assert expected in lines[0], (case, lines[0])
        assert "Traceback" not in done.stderr
        assert not out.exists(), case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")], case


@pytest.mark.parametrize("args,expected", [
    (("merge", "/nonexistent.yml", "/tmp/x"), "config file not found"),
])  # fmt: skip
def test_missing_config(args, expected):
    done = _run(*args)
    assert done.returncode == 2 and expected in done.stderr


def test_tokenizer_source_and_allow_pickle_from_config(tmp_path, zoo):
    import torch

    from evomerge.models.checkpoint import Checkpoint

    base, ft1, ft2 = zoo["llama"]
    pickled = tmp_path / "pickled-ft2"
    shutil.copytree(ft2, pickled)
    ckpt = Checkpoint.open(pickled)
    torch.save({n: ckpt.get(n) for n in ckpt.names()}, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    (pickled / "tokenizer.json").write_text((ft2 / "tokenizer.json").read_text().replace('"w59"', '"zz59"'))
    models = [
        {"model": str(ft1), "parameters": {"weight": 0.5}},
        {"model": str(pickled), "parameters": {"weight": 0.5}},
    ]
    refused = _run(
        "merge", _config(tmp_path, zoo, merge_method="task_arithmetic", models=models), tmp_path / "a"
    )
    assert refused.returncode == 2 and "allow_pickle" in refused.stderr
    cfg = _config(
        tmp_path,
        zoo,
        merge_method="task_arithmetic",
        models=models,
        allow_pickle=True,
        tokenizer_source=str(pickled),
    )
    done = _run("merge", cfg, tmp_path / "b")
    assert done.returncode == 0, done.stderr
    assert "zz59" in (tmp_path / "b" / "tokenizer.json").read_text()
