"""Merge kernels: pure functions on tensors (any device; float32 math; no configs, no models).

Each returns a new float32 tensor. The `*_into` / `gta_into` forms write into a given output and are what
the in-memory engine compiles into fused single-pass kernels.
"""

from evomerge.merge.kernels.dare import dare_linear, dare_ties
from evomerge.merge.kernels.linear import linear
from evomerge.merge.kernels.slerp import slerp
from evomerge.merge.kernels.task_arithmetic import task_arithmetic
from evomerge.merge.kernels.ties import ties

__all__ = ["dare_linear", "dare_ties", "linear", "slerp", "task_arithmetic", "ties"]
