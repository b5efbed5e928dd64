"""Executors: where candidates are merged and scored. The search loop submits jobs and collects outcomes;
it never learns which executor ran them, and every executor runs the same jobs to the same outcomes.

`local` runs one worker in this process (no Ray imported); `ray` (runtime/ray_executor.py) runs one
actor per GPU or CPU slot. Both take a worker *factory*, so the loop, a benchmark's simulated worker and
the real merge-and-evaluate worker all go through the same scheduling code.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path

from evomerge.config import ExperimentConfig
from evomerge.runtime.jobs import Executor, Job, JobRunner, Outcome, Usage, WorkerFactory


class LocalExecutor:
    """One worker in this process, built on first use (a finished experiment reopened to print its
    results loads no model); jobs run one at a time in submission order."""

    capacity = 1

    def __init__(self, factory: WorkerFactory, on_load: Callable[[], None] | None = None) -> None:
        self.factory, self.on_load = factory, on_load
        self.worker: JobRunner | None = None
        self.queue: deque[Job] = deque()
        self.usage = Usage(workers=1)

    def submit(self, job: Job) -> None:
        if self.usage.first_submit is None:
            self.usage.first_submit = time.perf_counter()
        self.queue.append(job)

    def wait(self) -> list[tuple[Job, Outcome]]:
        if self.worker is None:
            if self.on_load:
                self.on_load()
            self.worker = self.factory()
            self.usage.first_submit = time.perf_counter()  # loading is not idleness
        job = self.queue.popleft()
        started = time.perf_counter()
        outcome = self.worker.run(job)
        self.usage.last_result = time.perf_counter()
        self.usage.busy_seconds += self.usage.last_result - started
        self.usage.jobs += 1
        return [(job, outcome)]

    def close(self) -> None:
        self.worker = None


def make_executor(
    config: ExperimentConfig,
    config_dir: Path | None,
    manager=None,
    factory: WorkerFactory | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Executor:
    """The executor `config.runtime` names, running workers built by `factory` (default: the experiment's
    real merge-and-evaluate worker)."""
    from evomerge.runtime.worker import build_worker

    say = on_stage or (lambda text: None)
    runtime = config.runtime
    if runtime.executor == "local":
        if factory is None:
            factory = partial(build_worker, config, config_dir, manager)
        return LocalExecutor(factory, on_load=lambda: say("loading models"))
    from evomerge.runtime.plan import ray_workers
    from evomerge.runtime.ray_executor import RayExecutor

    planned = ray_workers(runtime)
    workers, gpus = planned.workers, planned.gpus_per_worker
    if factory is None:
        data = config.model_dump(mode="json")
        data["runtime"]["device"] = planned.device
        factory = partial(build_worker, data, str(config_dir) if config_dir is not None else None)
    per = "1 GPU" if gpus else f"{runtime.ray.cpus_per_worker:g} CPU"
    return RayExecutor(
        factory,
        workers=workers,
        cpus_per_worker=runtime.ray.cpus_per_worker,
        gpus_per_worker=gpus,
        on_load=lambda: say(f"starting {workers} Ray workers ({per} each) and loading models"),
    )
