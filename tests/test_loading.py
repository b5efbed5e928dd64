"""Model loading: sharded safetensors, pickle refusal/opt-in, compatibility errors."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO

from evomerge.errors import UserError
from evomerge.models.checkpoint import Checkpoint
from evomerge.models.compat import check_compatible
from evomerge.models.synthetic import make_family


def test_sharded_checkpoint_reads_same_tensors(tmp_path, zoo):
    sharded = make_family(tmp_path, "llama", finetunes=0, seed=1, layers=3, max_shard_size="20KB")[0]
    assert (sharded / "model.safetensors.index.json").is_file()
    single = Checkpoint.open(zoo["llama"][0])
    ckpt = Checkpoint.open(sharded)
    assert len({info.file for info in ckpt.tensors.values()}) > 1
    assert set(ckpt.tensors) == set(single.tensors)
    for name in single.tensors:
        assert torch.equal(ckpt.get(name), single.get(name))


def test_dtype_conversion_on_read(zoo):
    ckpt = Checkpoint.open(zoo["llama"][0])
    name = next(ckpt.names())
    assert ckpt.get(name, dtype=torch.bfloat16).dtype == torch.bfloat16


def _to_pickle(src, dst):
    shutil.copytree(src, dst)
    ckpt = Checkpoint.open(dst)
    state = {name: ckpt.get(name) for name in ckpt.names()}
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return state


def test_pickle_refused_unless_allowed(tmp_path, zoo):
    state = _to_pickle(zoo["llama"][0], tmp_path / "pickled")
    with pytest.raises(UserError, match="allow_pickle"):
        Checkpoint.open(tmp_path / "pickled")
    ckpt = Checkpoint.open(tmp_path / "pickled", allow_pickle=True)
    assert ckpt.pickled
    assert all(torch.equal(ckpt.get(k), v) for k, v in state.items())


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path, zoo):
    d = tmp_path / "evil"
    shutil.copytree(zoo["llama"][0], d)
    (d / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights_only"):
        Checkpoint.open(d, allow_pickle=True)


def test_incompatible_shapes_name_tensor_and_models(tmp_path, zoo):
    other = make_family(tmp_path, "llama", finetunes=0, hidden=48, layers=3)[0]
    with pytest.raises(UserError) as err:
        check_compatible([Checkpoint.open(zoo["llama"][0]), Checkpoint.open(other)])
    msg = str(err.value)
    assert (
        msg.startswith("tensor ") and "has shape" in msg and str(zoo["llama"][0]) in msg and str(other) in msg
    )


def test_different_architectures_refused(zoo):
    with pytest.raises(UserError, match="different architectures"):
        check_compatible([Checkpoint.open(zoo["llama"][0]), Checkpoint.open(zoo["qwen2"][0])])


def test_vocab_mismatch_explains_fix(tmp_path, zoo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo["llama"][0])
    model.resize_token_embeddings(80)
    model.save_pretrained(tmp_path / "bigvocab")
    with pytest.raises(UserError, match=r"vocabulary sizes differ.*resize_token_embeddings\(80\)"):
        check_compatible([Checkpoint.open(zoo["llama"][0]), Checkpoint.open(tmp_path / "bigvocab")])


def _stored_as(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of a zoo model with its weights stored in `dtype` (as a hub bf16 checkpoint would be)."""
    import json

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    save_file(
        {k: v.to(dtype) for k, v in load_file(src / "model.safetensors").items()}, dst / "model.safetensors"
    )
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_auto_dtype_rules():
    from evomerge.models.checkpoint import auto_dtype

    zoo = [Checkpoint.open(REPO / "zoo" / n) for n in ("base", "math-en", "lang-x")]
    assert {c.stored_dtype for c in zoo} == {"float16"}
    assert auto_dtype(zoo, "cuda") == "float16" and auto_dtype(zoo, "cuda:1") == "float16"
    assert auto_dtype(zoo, "cpu") == "float32"  # no fast float16 arithmetic on a CPU


@pytest.mark.slow
def test_auto_dtype_chosen_from_headers_printed_and_journaled(tmp_path):
    """bfloat16 checkpoints: validate says so, the search holds the models in bfloat16 and journals the
    choice; one float32 model among them makes it float32."""
    import json
    import sqlite3

    from helpers import cli, smoke

    zoo = REPO / "zoo"
    models = [str(_stored_as(zoo / n, tmp_path / n, torch.bfloat16)) for n in ("base", "math-en", "lang-x")]
    cfg = smoke(tmp_path, **{"models.base": models[0], "models.sources": models[1:], "optimizer.budget": 6})
    checked = cli("validate", cfg)
    assert (
        checked.returncode == 0 and "dtype: bfloat16 (auto; the checkpoints store bfloat16" in checked.stdout
    )
    assert cli("search", cfg).returncode == 0
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    config = json.loads(db.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0])
    assert config["runtime"]["dtype"] == "bfloat16"
    # an experiment made with float32 (the old default) resumes under auto with its journaled float32
    explicit = smoke(tmp_path, **{"models.base": models[0], "models.sources": models[1:], "optimizer.budget": 6,
                                  "runtime.dtype": "float32"})  # fmt: skip
    assert cli("search", explicit, "--out", tmp_path / "old").returncode == 0
    resumed = cli("search", cfg, "--out", tmp_path / "old", "--budget", 12)
    assert resumed.returncode == 0, resumed.stderr
    said = "runtime.dtype auto: resuming with the journaled float32"
    assert said in resumed.stdout and said in (tmp_path / "old" / "search.log").read_text()
    db = sqlite3.connect(tmp_path / "old" / "experiment.sqlite")
    config = json.loads(db.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0])
    assert (
        config["runtime"]["dtype"] == "float32"
        and db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 12
    )
    mixed = smoke(tmp_path, **{"models.base": str(zoo / "base"), "models.sources": models[1:]})
    assert "dtype: float32 (auto; the checkpoints store bfloat16, float16" in cli("validate", mixed).stdout
