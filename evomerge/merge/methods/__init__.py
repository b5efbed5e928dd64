"""The method registry: every module of this package that defines `METHOD` is a merge method.

`Method` is the enum of their names (what configs and journals hold); `method.spec` is the
`MergeMethod` with everything else. Adding a method is adding a module (see README, "Adding a merge
method"). Defaults and parameter names follow mergekit 0.1.5, so a mergekit config means the same here.
"""

from __future__ import annotations

import importlib
import pkgutil
from enum import Enum
from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.merge.methods.base import MergeMethod, Param, TensorParams, dare_keys, tie_keys

if TYPE_CHECKING:
    import torch

__all__ = ["REGISTRY", "MergeMethod", "Method", "Param", "TensorParams", "dare_keys", "merge_tensor",
           "parse_method", "tie_keys"]  # fmt: skip


def _discover() -> dict[str, MergeMethod]:
    found: dict[str, MergeMethod] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if not isinstance(method, MergeMethod):
            raise RuntimeError(f"{module.__name__} defines no METHOD")
        if method.name in found:
            raise RuntimeError(f"merge method {method.name} is defined twice")
        found[method.name] = method
    return found


REGISTRY: dict[str, MergeMethod] = _discover()


class _MethodName(str, Enum):
    @property
    def spec(self) -> MergeMethod:
        return REGISTRY[self.value]

    @property
    def uses_base(self) -> bool:
        return self.spec.needs_base


Method = _MethodName("Method", {name: name for name in REGISTRY})  # type: ignore[misc]


def parse_method(name: str) -> Method:
    try:
        return Method(name)
    except ValueError:
        raise UserError(f"unknown merge method {name!r} (supported: {', '.join(REGISTRY)})") from None


def merge_tensor(
    method: Method, name: str, base: torch.Tensor | None, models: list[torch.Tensor], p: TensorParams
) -> torch.Tensor:
    """Exact merge of one tensor (float32 result). `models` excludes the base for base-using methods."""
    return method.spec.exact(name, base, models, p)
