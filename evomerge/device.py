"""Pick the torch device: cuda when present, else cpu, unless the user names one."""

from __future__ import annotations

import torch

from evomerge.errors import UserError


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but CUDA is not available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return name


def dtype_device(name: str = "auto") -> str:
    """The device kind `runtime.dtype: auto` chooses for, without failing where CUDA is missing (validate
    may run on another machine than the search): the named one, else cuda when present."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"
