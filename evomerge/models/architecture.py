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
)

FAMILIES: dict[str, Family] = {
    name: Family(name=name, **_LLAMA_LIKE) for name in ("llama", "mistral", "qwen2", "qwen3")
}


def family_for(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise KeyError(model_type)
    return FAMILIES[model_type]
