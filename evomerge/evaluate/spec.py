"""What to evaluate: tasks, their metric and weight, and how examples split into search and held-out."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    metric: str | None = Field(
        None, description="lm-eval result key, e.g. 'exact_match,strict-match'; default: the task's first"
    )
    weight: float = 1.0
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
    seed: int = 0


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskSpec] = Field(min_length=1)
    include_paths: list[str] = []
    split: SplitSpec = SplitSpec()
    batch_size: int = Field(64, gt=0)
