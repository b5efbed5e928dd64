"""Runtime settings resolved once, before anything loads, and handed down as concrete values.

`runtime.dtype`, `placement` and `pin_memory` may say `auto` in a config; `validate.check_config` works
out what `auto` means here (the checkpoints' stored dtype; the memory plan's placement and pinning), and
`RuntimePlan.apply` writes the answers into the config the search journals and its workers receive. A
worker or the engine never sees `auto`: they take the plan's values.

The Ray executor's part (how many workers, with a GPU each or CPU slots) depends on the cluster it joins,
so `ray_workers` resolves it when the executor starts, before any actor loads a model; the actors are
then given `cuda` (their own GPU, seen as cuda:0) or `cpu`, never `auto`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evomerge.config import ExperimentConfig
    from evomerge.validate import Validation


@dataclass(frozen=True)
class RuntimePlan:
    device: str  # cpu | cuda | cuda:N; for the Ray executor as written (see ray_workers)
    dtype: str  # float32 | bfloat16 | float16
    placement: str  # device | host
    pin_memory: str  # on | off

    def apply(self, config: ExperimentConfig) -> ExperimentConfig:
        """`config` with these values in its runtime section (what the experiment journals)."""
        runtime = config.runtime.model_copy(
            update={"device": self.device, "dtype": self.dtype, "placement": self.placement,
                    "pin_memory": self.pin_memory}
        )  # fmt: skip
        return config.model_copy(update={"runtime": runtime})


def resolve_runtime(config: ExperimentConfig, checked: Validation) -> RuntimePlan:
    """What every `auto` of `config.runtime` means on this machine, from `check_config`'s findings."""
    from evomerge.device import resolve_device

    runtime = config.runtime
    device = runtime.device
    if runtime.executor == "local":
        device = resolve_device(device)
    dtype = runtime.dtype if runtime.dtype != "auto" else (checked.dtype or "float32")
    if dtype == "auto":
        dtype = "float32"
    placement = runtime.placement
    if placement == "auto":
        placement = checked.placement or "device"  # no plan (DFS, or data unreachable): all on the device
    pin = runtime.pin_memory
    if pin == "auto":
        pin = "on" if checked.pinned else "off"
    return RuntimePlan(device, dtype, placement, pin)


@dataclass(frozen=True)
class RayWorkers:
    workers: int
    gpus_per_worker: int  # 1: one GPU per actor; 0: CPU slots
    device: str  # what each actor's worker is told: cuda (its own GPU) or cpu


def ray_workers(runtime) -> RayWorkers:
    """Join (or start) the Ray cluster `runtime.ray` names and size the workers to it: one per GPU when
    the device is cuda (or auto on a cluster with GPUs), else one per `cpus_per_worker` CPUs, unless
    `runtime.ray.workers` says; UserError when the cluster cannot hold them."""
    from evomerge.runtime.ray_executor import plan_workers, start_ray

    start_ray(runtime.ray.address)
    workers, gpus = plan_workers(runtime.ray.workers, runtime.ray.cpus_per_worker, runtime.device)
    return RayWorkers(workers, gpus, "cuda" if gpus else "cpu")


def concrete(config: ExperimentConfig) -> None:
    """Refuse, as a bug, a runtime section that still says `auto` where a worker needs a value."""
    runtime = config.runtime
    if "auto" in (runtime.dtype, runtime.placement, runtime.pin_memory):
        raise RuntimeError("internal error: runtime settings reach a worker unresolved (see runtime/plan.py)")
