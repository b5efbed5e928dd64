"""Merge kernels: pure functions on tensors (any device; float32 math; no configs, no models).

Each returns a new float32 tensor. The `*_into` / `gta_into` forms write into a given output and are what
the in-memory engine compiles into fused single-pass kernels. Submodules and the functions below load on
first use, so that configs (which read the method registry) load without torch.
"""

from __future__ import annotations

import importlib

# functions reachable as kernels.<name>; a function named as its module is kernels.<module>.<name> (once
# the submodule is imported, Python binds the module's name on this package)
_FUNCTIONS = {
    "dare_linear": "dare",
    "dare_ties": "dare",
    "linear_into": "linear",
    "lerp_into": "slerp",
    "slerp_coefficients": "slerp",
    "slerp_dot": "slerp",
}

__all__ = sorted(_FUNCTIONS)


def __getattr__(name: str):
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
