"""Tiny random models of a supported family, for tests and the shipped example.

A base is initialised from a seed; each fine-tune adds a seeded perturbation of mixed magnitudes and
signs, so trimming, sign election and interpolation all have real work to do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]


def _config(family: str, hidden: int, layers: int, vocab: int, tie: bool = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"no synthetic config for {family}")


def word_tokenizer(vocab: list[str]):
    """Whitespace word-level tokenizer over `vocab`, which must hold <unk> <s> </s> <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_tokenizer(directory: Path, tokenizer=None) -> None:
    """Save `tokenizer` (default: the synthetic models' word tokenizer) loadable by transformers 4 and 5."""
    (tokenizer or word_tokenizer(WORDS)).save_pretrained(directory)
    cfg_file = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads in transformers 4 and 5
    cfg_file.write_text(json.dumps(cfg, indent=2))


def make_family(
    root: Path,
    family: str = "llama",
    *,
    finetunes: int = 2,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tie: str | None = None,
) -> list[Path]:
    """Write base + fine-tunes under `root`; returns [base, ft1, ...]. `tie`: tie_word_embeddings with
    lm_head.weight still stored (as some hub checkpoints do): "equal" to the embeddings (loaded tied) or
    "different" (transformers then keeps them apart)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family, hidden, layers, len(WORDS), tie is not None)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(finetunes + 1):
        name = "base" if i == 0 else f"ft{i}"
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                param.copy_(base_state[key])
                if i:
                    scale = torch.rand((), generator=gen).item() * 0.05 + 0.01
                    noise = torch.randn(param.shape, generator=gen) * scale
                    # heavy-tailed: a few large entries per tensor, as real task vectors have
                    noise = noise * (1 + 4 * (torch.rand(param.shape, generator=gen) < 0.05))
                    param.add_(noise.to(dtype))
        out = root / f"{family}-{name}"
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **kwargs)
        if tie:
            from safetensors.torch import load_file, save_file

            state = load_file(out / "model.safetensors")
            head = state["model.embed_tokens.weight"].clone()
            if tie == "different":
                head += 0.01 * torch.randn(head.shape, generator=gen).to(dtype)
            save_file(
                {**state, "lm_head.weight": head.contiguous()}, out / "model.safetensors", {"format": "pt"}
            )
        save_tokenizer(out)
        paths.append(out)
    return paths


def write_virtual(directory: Path, config: dict, dtype: str = "BF16", shard_bytes: int = 4 * 1024**3) -> Path:
    """A checkpoint of a Llama-layout `config` (7B, 14B...) whose safetensors file has a real header and
    no written weights (a sparse file: it takes no disk): for planning arithmetic on real shapes."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"model.embed_tokens.weight": [config["vocab_size"], hidden], "model.norm.weight": [hidden]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": [heads * head_dim, hidden],
            p + "self_attn.k_proj.weight": [kv * head_dim, hidden],
            p + "self_attn.v_proj.weight": [kv * head_dim, hidden],
            p + "self_attn.o_proj.weight": [hidden, heads * head_dim],
            p + "mlp.gate_proj.weight": [inter, hidden],
            p + "mlp.up_proj.weight": [inter, hidden],
            p + "mlp.down_proj.weight": [hidden, inter],
            p + "input_layernorm.weight": [hidden],
            p + "post_attention_layernorm.weight": [hidden],
        }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = [config["vocab_size"], hidden]
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    shards: list[dict] = [{}]
    sizes = [0]
    for name, shape in shapes.items():
        size = width
        for d in shape:
            size *= d
        if sizes[-1] and sizes[-1] + size > shard_bytes:  # sharded as hub checkpoints are
            shards.append({})
            sizes.append(0)
        shards[-1][name] = {"dtype": dtype, "shape": shape, "data_offsets": [sizes[-1], sizes[-1] + size]}
        sizes[-1] += size
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, (header, total) in enumerate(zip(shards, sizes, strict=True)):
        file = (
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        )
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (directory / file).open("wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + total)
        weight_map |= dict.fromkeys(header, file)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config))
    return directory
