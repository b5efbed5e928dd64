"""Data-flow-space candidates: a decoder whose layers are a path through the resident source layers.

No weight is copied per candidate. Each hop of the path points at a source layer (shared parameters),
multiplies the hidden state it receives by its scale, and has its own attention-cache slot, so a layer used
twice in a path keeps two caches. The embeddings come from one source and the final norm + lm_head from
one source (`ends`; model A's by default); the model's config and class are model A's.
Works for the Llama-like families of the architecture table (Llama, Mistral, Qwen2/3).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from evomerge.errors import UserError

Slot = tuple[int, int]  # (source index, layer index)


class Hop(nn.Module):
    def __init__(self, layer: nn.Module, index: int, scale: float) -> None:
        super().__init__()
        self.layer = _with_cache_slot(layer, index)
        self.scale = float(scale)
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


def _with_cache_slot(layer: nn.Module, index: int) -> nn.Module:
    """A shallow twin of `layer` (same parameter tensors) whose attention writes cache slot `index`."""
    twin = copy.copy(layer)
    twin._modules = dict(layer._modules)
    attn = copy.copy(layer.self_attn)
    attn._modules = dict(layer.self_attn._modules)
    attn.layer_idx = index
    twin._modules["self_attn"] = attn
    return twin


def path_model(
    sources: Sequence[nn.Module],
    path: Sequence[Slot],
    scales: Sequence[float] | None = None,
    ends: tuple[int, int] = (0, 0),
) -> nn.Module:
    """A causal LM of model A's class running `path` (with per-hop input `scales`, default 1), its
    embeddings from source `ends[0]` and its final norm + lm_head from source `ends[1]`."""
    if not path:
        raise UserError("a data-flow path needs at least one layer")
    scales = [1.0] * len(path) if scales is None else list(scales)
    if len(scales) != len(path):
        raise ValueError("one scale per hop")
    a = sources[0]
    for s, layer in path:
        if not (0 <= s < len(sources) and 0 <= layer < len(sources[s].model.layers)):
            raise UserError(f"path slot ({s}, {layer}) is not a layer of the sources")
    for e in ends:
        if not 0 <= e < len(sources):
            raise UserError(f"path end {e} is not one of the {len(sources)} sources")
    embed, head = sources[ends[0]], sources[ends[1]]
    vocab = a.model.embed_tokens.weight.shape[0]
    if embed.model.embed_tokens.weight.shape[0] != vocab or head.lm_head.weight.shape[0] != vocab:
        raise UserError("the path's ends come from models with different vocabularies")
    config = copy.deepcopy(a.config)
    config.num_hidden_layers = len(path)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [sources[s].config.layer_types[layer] for s, layer in path]
    with torch.device("meta"):
        model = type(a)(config)
    model.model.embed_tokens = embed.model.embed_tokens
    model.model.norm = head.model.norm
    model.model.rotary_emb = a.model.rotary_emb
    model.lm_head = head.lm_head
    model.model.layers = nn.ModuleList(
        Hop(sources[s].model.layers[layer], i, scale)
        for i, ((s, layer), scale) in enumerate(zip(path, scales, strict=True))
    )
    model.generation_config = a.generation_config
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: path model left unbound tensors: {leftover[:3]}")
    return model.eval()
