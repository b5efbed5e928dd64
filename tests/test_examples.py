"""The shipped example configs run on the shipped tiny models, from any working directory."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.offline import merge_from_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("example-*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_example_config_merges(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative model paths fall back to the config's directory
    summary = merge_from_config(config, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert summary.tensors == len(tensors) > 0
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
