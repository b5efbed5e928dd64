"""The Ray executor: one actor per GPU (or per CPU slot), each holding the sources once.

Each actor builds its worker once (sources resident, its own target model, its own lm-eval wrapper) and
then merges and scores one job at a time; what comes back is an `Outcome` (a few numbers), never weights.
The driver alone writes the journal. An actor that dies mid-job (killed, out of memory, segfault) is
replaced and the job is run again on the new one; a job that has killed `MAX_ATTEMPTS` workers is
returned as failed, so one poisonous candidate cannot stall the run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from evomerge.errors import UserError, first_line
from evomerge.runtime.jobs import Job, Outcome, Usage, WorkerFactory

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


class EvalWorker:
    """The body of a Ray actor (wrapped with `ray.remote` when the executor starts)."""

    def __init__(self, factory: WorkerFactory, threads: int | None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.worker = factory()

    def pid(self) -> int:
        """Answered once the worker is built: the executor's readiness probe."""
        return os.getpid()

    def run(self, job: Job) -> tuple[Outcome, float]:
        started = time.perf_counter()
        outcome = self.worker.run(job)
        return outcome, time.perf_counter() - started


def start_ray(address: str | None) -> None:
    """Join `address`, or start a private local cluster: no dashboard, no usage stats, and Ray's token
    authentication on. Ray 2.x's GCS and raylet listen on every interface whatever the node address
    (it maps loopback to the machine's IP), so the token is what keeps other hosts out: a process that
    does not hold `~/.ray/auth_token` (or RAY_AUTH_TOKEN) cannot join or submit work."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if address is None:
        check_private_cluster_auth()
    else:
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise UserError(f"runtime.ray: cannot start or join {where}: {first_line(exc, 200)}") from None


def check_private_cluster_auth() -> None:
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":  # Ray's default (2.5x+) is token
        raise UserError(
            f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: evomerge's private Ray cluster keeps token "
            "authentication on (its services listen on the network); unset RAY_AUTH_MODE"
        )


def plan_workers(workers: int | None, cpus_per_worker: float, device: str) -> tuple[int, int]:
    """(workers, GPUs per worker) for the cluster Ray is connected to; UserError when it cannot hold them."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    cpus = float(total.get("CPU", 0))
    use_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise UserError(f"runtime.device is {device} but the Ray cluster has no GPU")
    if workers is None:
        workers = gpus if use_gpu else max(1, int(cpus // cpus_per_worker))
    if use_gpu and workers > gpus:
        raise UserError(
            f"runtime.ray.workers: {workers} workers need {workers} GPUs; the Ray cluster has {gpus}"
        )
    if workers * cpus_per_worker > cpus:
        raise UserError(
            f"runtime.ray.workers: {workers} workers × {cpus_per_worker:g} CPUs need "
            f"{workers * cpus_per_worker:g} CPUs; the Ray cluster has {cpus:g} "
            "(lower --workers or runtime.ray.cpus_per_worker)"
        )
    return workers, 1 if use_gpu else 0


class RayExecutor:
    def __init__(
        self,
        factory: WorkerFactory,
        *,
        workers: int,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: int = 0,
        on_load: Callable[[], None] | None = None,
    ) -> None:
        import ray

        self.ray = ray
        self.factory = factory
        threads = None if gpus_per_worker else max(1, int(cpus_per_worker))
        self._actor_class = ray.remote(EvalWorker).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0, max_task_retries=0
        )
        self._threads = threads
        self.capacity = workers
        self.usage = Usage(workers=workers)
        if on_load:
            on_load()
        self.actors = [self._spawn() for _ in range(workers)]
        try:  # every worker loads at once; a worker that cannot start is a setup error, said once
            ray.get([actor.pid.remote() for actor in self.actors])
        except ray.exceptions.RayError as exc:
            self.close()
            raise UserError(f"a Ray worker could not start: {_cause(exc)}") from None
        self.free = list(range(workers))
        self.running: dict[Any, tuple[int, Job]] = {}
        self.attempts: dict[Any, int] = {}

    def _spawn(self):
        return self._actor_class.remote(self.factory, self._threads)

    def submit(self, job: Job) -> None:
        if self.usage.first_submit is None:
            self.usage.first_submit = time.perf_counter()
        self._send(self.free.pop(0), job)

    def _send(self, slot: int, job: Job) -> None:
        self.running[self.actors[slot].run.remote(job)] = (slot, job)

    def wait(self) -> list[tuple[Job, Outcome]]:
        ray = self.ray
        finished: list[tuple[Job, Outcome]] = []
        while not finished and self.running:
            ready, rest = ray.wait(list(self.running), num_returns=1)
            if rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                slot, job = self.running.pop(ref)
                try:
                    outcome, seconds = ray.get(ref)
                    self.usage.busy_seconds += seconds
                except ray.exceptions.RayActorError as exc:
                    outcome = self._worker_died(slot, job, exc)
                    if outcome is None:
                        continue  # sent again, to the replacement
                except ray.exceptions.RayTaskError as exc:  # the worker raised outside its own guard
                    outcome = Outcome(False, -math.inf, reason=f"worker: {_cause(exc)}")
                self.attempts.pop(job.key, None)
                self.free.append(slot)
                self.usage.jobs += 1
                finished.append((job, outcome))
        self.free.sort()
        self.usage.last_result = time.perf_counter()
        return finished

    def _worker_died(self, slot: int, job: Job, exc: BaseException) -> Outcome | None:
        """Replace the dead actor; run the job again unless it has now killed MAX_ATTEMPTS workers."""
        attempts = self.attempts.get(job.key, 0) + 1
        self.attempts[job.key] = attempts
        self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._spawn()
        if attempts < MAX_ATTEMPTS:
            log.warning(
                "worker %d died during job %s (%s); retrying on a new worker", slot, job.key, _cause(exc)
            )
            self._send(slot, job)
            return None
        log.warning("job %s killed its worker %d times; recorded as failed", job.key, attempts)
        return Outcome(False, -math.inf, reason=f"worker died {attempts} times running it ({_cause(exc)})")

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    lines = [line for line in text if line.strip() and not line.startswith(("Traceback", "  "))]
    return first_line(Exception(lines[-1] if lines else type(exc).__name__), 200)
