"""Architecture table: how a family's tensors divide into merge groups.

A *group* is the unit a recipe assigns parameters to: the embeddings, each transformer layer (optionally
split into its attention and MLP parts), and the head (final norm + lm_head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMBED = "embed"
HEAD = "head"


@dataclass(frozen=True)
class Family:
    """Naming conventions of one decoder-only family (as in its safetensors checkpoints)."""

    name: str
    embed: tuple[str, ...]
    head: tuple[str, ...]
    layer_pattern: str
    attn_markers: tuple[str, ...]
    mlp_markers: tuple[str, ...]
    num_layers_key: str = "num_hidden_layers"
    tied: tuple[tuple[str, str], ...] = ()  # (name, the tensor it shares storage with when tied)

    def layer_index(self, tensor: str) -> int | None:
        match = re.match(self.layer_pattern, tensor)
        return int(match.group(1)) if match else None

    def part(self, tensor: str) -> str:
        """'attn' or 'mlp' for a layer tensor; layer norms go with the block they feed."""
        if any(marker in tensor for marker in self.mlp_markers):
            return "mlp"
        if any(marker in tensor for marker in self.attn_markers):
            return "attn"
        raise ValueError(f"cannot tell whether {tensor} belongs to attention or MLP")

    def group(self, tensor: str, split: bool = False) -> str:
        index = self.layer_index(tensor)
        if index is not None:
            return f"layers.{index}.{self.part(tensor)}" if split else f"layers.{index}"
        if tensor in self.embed:
            return EMBED
        if tensor in self.head:
            return HEAD
        raise ValueError(f"tensor {tensor} is not part of the {self.name} layout")

    def group_names(self, num_layers: int, split: bool = False) -> list[str]:
        """All groups in model order: embeddings, layers, head."""
        layers = [
            name
            for i in range(num_layers)
            for name in ((f"layers.{i}.attn", f"layers.{i}.mlp") if split else (f"layers.{i}",))
        ]
        return [EMBED, *layers, HEAD]


_LLAMA_LIKE = dict(
    embed=("model.embed_tokens.weight",),
    head=("model.norm.weight", "lm_head.weight"),
    layer_pattern=r"^model\.layers\.(\d+)\.",
    attn_markers=(".self_attn.", ".input_layernorm."),
    mlp_markers=(".mlp.", ".post_attention_layernorm."),
    tied=(("lm_head.weight", "model.embed_tokens.weight"),),
)

FAMILIES: dict[str, Family] = {
    name: Family(name=name, **_LLAMA_LIKE) for name in ("llama", "mistral", "qwen2", "qwen3")
}


def merged_names(names: list[str], family: Family, tied: bool) -> list[str]:
    """The tensors a merge writes. When the model is loaded with lm_head sharing the embeddings' storage
    (`tied`), a stored lm_head.weight is not a tensor of the model: merging it too would write the head's
    merge over the embeddings in memory, and an export holding both would load differently from the
    model that was scored. It is left out; the embeddings' merge is both."""
    if not tied:
        return list(names)
    drop = {name for name, shared in family.tied if shared in names}
    return [name for name in names if name not in drop]


def family_for(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise KeyError(model_type)
    return FAMILIES[model_type]
