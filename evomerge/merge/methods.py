"""Merge methods, their parameters for one tensor, and the one place that calls the exact kernels.

Defaults follow mergekit 0.1.5 so that a mergekit config means the same thing here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from evomerge.errors import UserError
from evomerge.merge import kernels
from evomerge.merge.kernels.rng import derive_key


class Method(str, Enum):
    linear = "linear"
    task_arithmetic = "task_arithmetic"
    ties = "ties"
    dare_linear = "dare_linear"
    dare_ties = "dare_ties"
    slerp = "slerp"

    @property
    def uses_base(self) -> bool:
        """Task-vector methods and SLERP need a base model; linear averages its inputs."""
        return self is not Method.linear

    @property
    def uses_density(self) -> bool:
        return self in (Method.ties, Method.dare_linear, Method.dare_ties)

    @property
    def consensus(self) -> bool:
        """Elects a sign per entry and keeps only agreeing task-vector entries (TIES-style)."""
        return self in (Method.ties, Method.dare_ties)

    @property
    def default_normalize(self) -> bool:
        return self in (Method.linear, Method.ties)


def parse_method(name: str) -> Method:
    try:
        return Method(name)
    except ValueError:
        raise UserError(
            f"unknown merge method {name!r} (supported: {', '.join(m.value for m in Method)})"
        ) from None


@dataclass(frozen=True)
class TensorParams:
    """Everything a kernel needs for one tensor. `weights`/`densities` follow the method's inputs:
    the non-base models for task-vector methods, all models for linear; `t` for SLERP."""

    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    t: float = 0.5
    normalize: bool = False
    lam: float = 1.0
    rescale: bool = True
    seed: int = 0

    def validate(self, method: Method, where: str) -> None:
        for value in self.weights:
            if not math.isfinite(value):
                raise UserError(f"{where}: weight must be a finite number, got {value}")
        for value in self.densities:
            if not (math.isfinite(value) and 0 < value <= 1):
                raise UserError(f"{where}: density must be in (0, 1], got {value}")
        if not math.isfinite(self.lam):
            raise UserError(f"{where}: lambda must be a finite number, got {self.lam}")
        if method is Method.slerp and not (math.isfinite(self.t) and 0 <= self.t <= 1):
            raise UserError(f"{where}: t must be in [0, 1], got {self.t}")
        if method is Method.linear and self.normalize and abs(sum(self.weights)) < 1e-8:
            raise UserError(f"{where}: linear weights sum to 0, cannot normalize")


def dare_keys(seed: int, tensor: str, count: int) -> list[int]:
    """One mask key per task vector, from the candidate's seed and the tensor's name (never global RNG)."""
    return [derive_key(seed, tensor, j) for j in range(count)]


def tie_keys(tensor: str, count: int) -> list[int]:
    """Keys for the fast TIES path's tie-breaking among equal magnitudes; fixed per tensor."""
    return [derive_key("ties-tie-break", tensor, j) for j in range(count)]


def merge_tensor(
    method: Method, name: str, base: torch.Tensor | None, models: list[torch.Tensor], p: TensorParams
) -> torch.Tensor:
    """Exact merge of one tensor (float32 result). `models` excludes the base for base-using methods."""
    if method is Method.linear:
        return kernels.linear(models, p.weights, normalize=p.normalize)
    if method is Method.slerp:
        return kernels.slerp(p.t, base, models[0])
    if method is Method.task_arithmetic:
        return kernels.task_arithmetic(base, models, p.weights, normalize=p.normalize, lam=p.lam)
    if method is Method.ties:
        return kernels.ties(base, models, p.weights, p.densities, normalize=p.normalize, lam=p.lam)
    keys = dare_keys(p.seed, name, len(models))
    kernel = kernels.dare_ties if method is Method.dare_ties else kernels.dare_linear
    return kernel(
        base, models, p.weights, p.densities, keys, normalize=p.normalize, rescale=p.rescale, lam=p.lam
    )
