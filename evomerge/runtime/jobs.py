"""The executor interface, as plain data: a `Job` goes to a worker, an `Outcome` comes back (both cross
process boundaries as dataclasses of plain values); `Executor` is what the search loop drives. The local
executor (executor.py) and the Ray one (ray_executor.py) implement it; neither imports the other's module
for these types.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class Outcome:
    ok: bool
    fitness: float
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {metric, ids, values}
    item_evals: int = 0  # (task, item) pairs scored: what the evaluation cost

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """One evaluation: a recipe merged and scored, or a source model scored as it is (a parent), on a
    split or on some of the search items (`items`: document ids by task)."""

    key: Hashable
    split: str
    recipe: dict[str, Any] | None = None
    source: int | None = None
    items: dict[str, list[int]] | None = None


class JobRunner(Protocol):
    """What a worker offers an executor."""

    def run(self, job: Job) -> Outcome: ...


WorkerFactory = Callable[[], JobRunner]


@dataclass
class Usage:
    """How busy the workers were: the basis of the utilisation figure that bench_ray.py prints."""

    workers: int
    busy_seconds: float = 0.0
    first_submit: float | None = None
    last_result: float | None = None
    jobs: int = 0

    @property
    def wall_seconds(self) -> float:
        if self.first_submit is None or self.last_result is None:
            return 0.0
        return self.last_result - self.first_submit

    @property
    def utilisation(self) -> float:
        wall = self.wall_seconds
        return self.busy_seconds / (self.workers * wall) if wall > 0 else 0.0


class Executor(Protocol):
    capacity: int  # jobs it runs at once: the loop keeps this many submitted
    usage: Usage

    def submit(self, job: Job) -> None: ...

    def wait(self) -> list[tuple[Job, Outcome]]:
        """Block until at least one submitted job has finished; return every finished one."""
        ...

    def close(self) -> None: ...
