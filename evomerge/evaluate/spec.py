"""What to evaluate: tasks, their metric and weight, and how examples split into search and held-out."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    metric: str | None = Field(
        None, description="lm-eval result key, e.g. 'exact_match,strict-match'; default: the task's first"
    )
    weight: float = Field(1.0, allow_inf_nan=False)
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0, description="at most this many examples per split")
    gen_kwargs: dict[str, Any] | None = None
    split_as: str | None = Field(
        None,
        description="split this task's examples as the named task does (tasks reading the same examples "
        "must share the split, or one task's search examples are the other's held-out ones)",
    )


class SplitSpec(BaseModel):
    """Held-out examples are only used to score finalists and baselines, never to select candidates."""

    model_config = ConfigDict(extra="forbid")
    heldout: float | int = Field(0.5, description="fraction in (0, 1) or a count of examples per task")
    seed: int = Field(0, ge=0, lt=2**63)

    @field_validator("heldout")
    @classmethod
    def _share(cls, value: float | int) -> float | int:
        if isinstance(value, bool):
            raise ValueError("must be a fraction in (0, 1) or a count >= 1")
        if isinstance(value, float) and value.is_integer() and value >= 1:
            return int(value)  # `300.0` is a count
        if isinstance(value, float) and not (math.isfinite(value) and 0 < value < 1):
            raise ValueError(f"must be a fraction in (0, 1) or a count >= 1, got {value}")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a count must be at least 1, got {value}")
        return value


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskSpec] = Field(min_length=1)
    include_paths: list[str] = []
    split: SplitSpec = SplitSpec()
    batch_size: int = Field(64, gt=0, description="examples per forward pass; changes no score")

    @model_validator(mode="after")
    def _tasks_fit(self) -> EvaluationSpec:
        names = [t.name for t in self.tasks]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"tasks[{i}]: task {name} is listed twice")
        for i, task in enumerate(self.tasks):
            if task.split_as is not None and task.split_as not in names:
                raise ValueError(f"tasks[{i}].split_as: {task.split_as!r} is not one of the listed tasks")
        return self
