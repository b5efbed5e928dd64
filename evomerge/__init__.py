"""evomerge: evolutionary search for model-merging recipes."""

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load an exported evomerge model: `AutoModelForCausalLM.from_pretrained(path, **kwargs)`, plus the
    per-hop input scales a data-flow merge stores in its config (`evomerge_hop_scales`)."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.dfs import Hop

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    scales = getattr(model.config, "evomerge_hop_scales", None)
    if scales:
        layers = model.model.layers
        if len(scales) != len(layers):
            raise ValueError(f"{path}: {len(scales)} hop scales for {len(layers)} layers")
        for i, scale in enumerate(scales):
            if scale != 1.0:
                layers[i] = Hop(layers[i], i, scale)
    return model
