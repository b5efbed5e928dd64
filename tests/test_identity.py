"""Model identity: an experiment records where each model was found and a fingerprint of it; resuming
with other weights under the same name is refused. Hub ids resolve through the Hugging Face cache offline
(a cache layout built from the zoo), for validate, search and export alike."""

import json
import shutil
import sqlite3

import pytest
from helpers import REPO, cli, smoke

ZOO = REPO / "zoo"
NAMES = ("base", "math-en", "lang-x")


def _models(exp):
    db = sqlite3.connect(exp / "experiment.sqlite")
    value = db.execute("SELECT value FROM meta WHERE key='models'").fetchone()[0]
    db.close()
    return json.loads(value)


@pytest.mark.slow
def test_resume_with_other_weights_under_the_same_name_is_refused(tmp_path):
    paths = {n: tmp_path / "models" / n for n in NAMES}
    for n, p in paths.items():
        shutil.copytree(ZOO / n, p)
    cfg = smoke(
        tmp_path,
        **{
            "models.base": str(paths["base"]),
            "models.sources": [str(paths["math-en"]), str(paths["lang-x"])],
        },
        **{"optimizer.budget": 6},
    )
    assert cli("search", cfg).returncode == 0
    recorded = _models(tmp_path / "exp")
    assert recorded["sources"][0]["path"] == str(paths["math-en"].resolve())
    assert len(recorded["sources"][0]["fingerprint"]) == 64 and "hub" not in recorded["sources"][0]
    moved = tmp_path / "moved"  # the same weights elsewhere: still the same model
    shutil.copytree(paths["math-en"], moved)
    assert cli("search", cfg).returncode == 0
    shutil.copy(ZOO / "lang-x" / "model.safetensors", paths["math-en"] / "model.safetensors")
    db = tmp_path / "exp" / "experiment.sqlite"
    before = db.read_bytes()
    again = cli("search", cfg, "--budget", 12)
    assert again.returncode == 2, again.stderr
    lines = again.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "model " + str(paths["math-en"]) in lines[0] and "models.sources[0]" in lines[0]
    )
    assert "is not the one this experiment started with" in lines[0]
    assert db.read_bytes() == before


def _hub_cache(root):
    """A Hugging Face cache holding the zoo as evomerge-test/<name>, each at a made-up commit."""
    cache = root / "hub"
    for i, name in enumerate(NAMES):
        repo = cache / f"models--evomerge-test--{name}"
        commit = f"{i + 1:040x}"
        shutil.copytree(ZOO / name, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.mark.slow
def test_hub_ids_resolve_offline_through_the_cache(tmp_path):
    cache = _hub_cache(tmp_path)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    ids = [f"evomerge-test/{n}" for n in NAMES]
    cfg = smoke(tmp_path, **{"models.base": ids[0], "models.sources": ids[1:], "optimizer.budget": 6})
    checked = cli("validate", cfg, env_extra=env)
    assert checked.returncode == 0, checked.stderr
    assert "model evomerge-test/math-en: llama" in checked.stdout
    done = cli("search", cfg, env_extra=env)
    assert done.returncode == 0, done.stderr
    recorded = _models(tmp_path / "exp")
    assert recorded["base"]["hub"] == {"id": "evomerge-test/base", "revision": f"{1:040x}"}
    assert recorded["sources"][1]["hub"] == {"id": "evomerge-test/lang-x", "revision": f"{3:040x}"}
    out = tmp_path / "merged"
    exported = cli("export", tmp_path / "exp", out, env_extra=env)
    assert exported.returncode == 0, exported.stderr
    assert (out / "config.json").exists() and "evomerge-test/math-en" in (out / "README.md").read_text()
    missing = smoke(tmp_path, **{"models.base": "evomerge-test/absent", "models.sources": ids[1:]})
    assert "evomerge-test/absent: hub id, unchecked" in cli("validate", missing, env_extra=env).stdout
    refused = cli("search", missing, "--out", tmp_path / "never", env_extra=env)
    assert (
        refused.returncode == 2
        and "evomerge-test/absent" in refused.stderr
        and "HF_HUB_OFFLINE" in refused.stderr
    )
    assert not (tmp_path / "never").exists()
