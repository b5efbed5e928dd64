"""The memory plan: arithmetic from headers and config, on the zoo and on header-only checkpoints of real
7B/14B shapes; the refusal and its remedies; validate and search print it."""

import math

import pytest
from helpers import REPO, cli, smoke

from evomerge.errors import UserError
from evomerge.models.checkpoint import Checkpoint
from evomerge.models.compat import check_compatible
from evomerge.models.synthetic import write_virtual
from evomerge.runtime.memory import GiB, plan_memory, shapes_of

MISTRAL_7B = {
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "dtype": "bfloat16",
}  # fmt: skip
QWEN_14B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120,
    "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "dtype": "bfloat16",
}  # fmt: skip
GPU_24GB = 23_500_000_000  # what a 24 GB card reports free with nothing loaded (about 21.9 GiB)
RAM_64GB = 60 * GiB  # available on a 64 GB machine
TOTAL_64GB = 64 * 10**9  # its total


def _virtual(tmp_path, config, count=4):
    models = [Checkpoint.open(write_virtual(tmp_path / f"m{i}", config)) for i in range(count)]
    return models[0], models[1:], check_compatible(models)


def _plan(shapes, placement, table=0, **kw):
    args = dict(dtype="bfloat16", device="cuda", placement=placement, batch_size=32, eval_tokens=1024,
                loglikelihood=False, table_bytes=table, device_free=GPU_24GB, host_free=RAM_64GB,
                host_total=TOTAL_64GB, fused=True)  # fmt: skip
    return plan_memory(shapes, **(args | kw))


def test_virtual_checkpoint_is_real_safetensors_without_disk(tmp_path):
    base, _, _ = _virtual(tmp_path, MISTRAL_7B, count=1)
    assert sum(math.prod(t.shape) for t in base.tensors.values()) == 7_241_732_096  # Mistral-7B's count
    assert base.stored_dtype == "bfloat16"
    files = list((tmp_path / "m0").glob("*.safetensors"))
    assert len(files) == 4 and sum(f.stat().st_blocks * 512 for f in files) < 1024**2  # sharded, sparse


def test_mistral_7b_three_sources_fit_a_24gb_gpu_only_with_host_sources(tmp_path):
    from evomerge.merge.methods import Method

    base, sources, family = _virtual(tmp_path, MISTRAL_7B)
    shapes = shapes_of(base, sources, family, base.config)
    spec = Method.ties.spec
    table = sum(
        spec.state_bytes(n, r, 3) for n, r in zip(shapes.tensor_numels, shapes.row_lengths, strict=True)
    )
    width = 2
    model = 7_241_732_096 * width
    with pytest.raises(UserError) as refused:
        _plan(shapes, "device", table)
    line = str(refused.value)
    assert (
        "\n" not in line
        and line.startswith("memory plan: a worker needs")
        and "runtime.placement: host" in line
    )
    plan = _plan(shapes, "auto", table)
    assert plan.placement == "host" and plan.fits()
    assert plan.on_device["target"] == model
    # 54 GiB page-locked would leave a 64 GB machine 6: they stay pageable (auto), unless asked for
    assert not plan.pinned and plan.on_host["sources (pageable)"] == 4 * model
    assert _plan(shapes, "auto", table, pin="on").on_host["sources (pinned)"] == 4 * model
    roomy = _plan(shapes, "auto", table, host_total=128 * 10**9, host_free=120 * GiB)
    assert roomy.pinned and roomy.on_host["sources (pinned)"] == 4 * model
    assert not _plan(shapes, "auto", table, host_total=128 * 10**9, pin="off").pinned
    assert plan.on_device["KV cache"] == 32 * 1024 * 2 * 32 * 8 * 128 * width  # 4 GiB
    assert plan.on_device["staging"] == 2 * 4 * 32000 * 4096 * width  # two sets of the largest tensor
    assert plan.device_bytes < GPU_24GB and plan.host_bytes < RAM_64GB
    assert 0.2 * GiB < plan.on_device["tables"] < 0.5 * GiB
    assert _plan(shapes, "auto", table, device_free=200 * GiB).placement == "device"  # an H200 holds it all
    lines = plan.lines()
    assert (
        lines[0] == "memory per worker, sources on the host:"
        and "cuda" in lines[1]
        and "host RAM" in lines[2]
    )


def test_14b_does_not_fit_a_24gb_gpu_even_streaming(tmp_path):
    base, sources, family = _virtual(tmp_path, QWEN_14B, count=3)
    shapes = shapes_of(base, sources, family, base.config)
    with pytest.raises(UserError, match=r"memory plan: a worker needs .* \(largest: target 27\.5 GiB\)"):
        _plan(shapes, "host")
    assert _plan(shapes, "host", device_free=80 * GiB, host_free=128 * GiB).fits()


def test_zoo_plan_arithmetic_and_cli(tmp_path):
    zoo = [Checkpoint.open(REPO / "zoo" / n) for n in ("base", "math-en", "lang-x")]
    shapes = shapes_of(zoo[0], zoo[1:], check_compatible(zoo), zoo[0].config)
    numel = sum(math.prod(t.shape) for t in zoo[0].tensors.values())
    plan = plan_memory(shapes, dtype="float32", device="cpu", placement="auto", batch_size=100, eval_tokens=64,
                       loglikelihood=True, table_bytes=0, device_free=None, host_free=8 * GiB)  # fmt: skip
    assert plan.on_device["target"] == 4 * numel and plan.on_device["sources"] == 3 * 4 * sum(
        shapes.tensor_numels
    )
    assert plan.on_device["logits"] == 100 * 64 * zoo[0].config["vocab_size"] * 4
    shown = cli("validate", REPO / "configs" / "demo.yaml")
    assert shown.returncode == 0 and "memory per worker, sources on the device:" in shown.stdout
    huge = smoke(tmp_path, **{"evaluation.batch_size": 10**6, "runtime.eval_tokens": 10**6})
    refused = cli("search", huge, "--out", tmp_path / "never")
    assert refused.returncode == 2 and refused.stderr.startswith("error: memory plan: a worker needs")
    assert "smaller evaluation.batch_size" in refused.stderr and not (tmp_path / "never").exists()
