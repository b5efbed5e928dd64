"""Model loading: sharded safetensors, pickle refusal/opt-in, compatibility errors."""

import shutil

import pytest
import torch

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
