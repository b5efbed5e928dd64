"""Where models are opened and loaded, one home for all: checkpoints of an experiment (headers only),
the resident target model (transformers), and a tokenizer. Everything that reads a model calls these."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evomerge.errors import UserError, first_line
from evomerge.models.checkpoint import Checkpoint

if TYPE_CHECKING:
    from evomerge.config import ExperimentConfig


def open_models(config: ExperimentConfig, config_dir: Path | None):
    """(base checkpoint or None, source checkpoints, family); headers only. Raises UserError when a
    model is missing or the models cannot be merged together."""
    from evomerge.models.compat import check_compatible

    base = Checkpoint.open(config.models.base, base_dir=config_dir) if config.models.base else None
    sources = [Checkpoint.open(ref, base_dir=config_dir) for ref in config.models.sources]
    family = check_compatible(([base] if base else []) + sources)
    return base, sources, family


def load_target(
    ckpt: Checkpoint,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """The resident model candidates are written into: the first source loaded once, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(ckpt.path), dtype=dtype or "auto", trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise UserError(f"model {ckpt.ref}: transformers cannot load it ({first_line(exc)})") from None
    return model.to(device).eval()


def load_tokenizer(ckpt, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt.path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(f"model {ckpt.ref}: cannot load its tokenizer ({first_line(exc, 200)})") from None
