"""What to evaluate: tasks, their metric and weight, and how examples split into search and held-out."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["full", "subsample", "anchors", "racing"]
MODES = get_args(Mode)


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

    @field_validator("heldout", mode="before")
    @classmethod
    def _share(cls, value: Any) -> float | int:
        return heldout_share(value)


def heldout_share(value: Any) -> float | int:
    """The held-out share as written: an integer is a count of examples (>= 1), a float a fraction in
    (0, 1). `1.0` is refused rather than guessed: it reads as "everything" and as "one item"."""
    if isinstance(value, str):  # the command line's --heldout
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"must be a fraction in (0, 1) or a count >= 1, got {text!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a fraction in (0, 1) or a count >= 1, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"a count must be at least 1, got {value}")
        return value
    if not (math.isfinite(value) and 0 < value < 1):
        hint = (
            f"; for a count of examples write the integer {int(value)}"
            if value.is_integer() and value >= 1
            else ""
        )
        raise ValueError(f"a fraction must be in (0, 1), got {value}{hint}")
    return value


SMALL_HELDOUT = 30  # fewer held-out items than this cannot tell finalists apart


def small_heldout_warnings(sizes: dict[str, int]) -> list[str]:
    """A warning per task whose held-out split is too small to compare finalists on."""
    return [
        f"warning: task {name} has only {size} held-out items: too few to tell the finalists apart "
        f"(aim for at least {SMALL_HELDOUT}; evaluation.split.heldout)"
        for name, size in sizes.items()
        if size < SMALL_HELDOUT
    ]


class FidelitySpec(BaseModel):
    """Which search items a candidate pays for (search/fidelity.py). Written in YAML as `full`, `racing`,
    `{subsample: {items: m}}`, `{anchors: {items: m, refresh: r}}` or `{racing: {items: m, eta: 2}}`, each
    with an optional `rescore_top: k` beside the mode."""

    model_config = ConfigDict(extra="forbid")
    mode: Mode = "full"
    items: int | None = Field(
        None, ge=1, description="items per task: each round's subset, the anchors, or racing's first rung"
    )
    rescore_top: int = Field(
        5, ge=1, description="best candidates by estimate re-scored on every search item"
    )
    refresh: int = Field(4, ge=1, description="anchors: re-chosen every this many rounds")
    eta: int = Field(2, ge=2, description="racing: 1/eta of a rung's candidates go on, with eta x the items")

    @model_validator(mode="before")
    @classmethod
    def _spelling(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value in ("subsample", "anchors"):
                raise ValueError(f"{value} needs a size: {{{value}: {{items: m}}}}")
            return {"mode": value}
        if not isinstance(value, dict) or "mode" in value or not (set(value) & set(MODES)):
            return value  # the validated shape (a config snapshot), or defaults
        modes = [k for k in value if k in MODES]
        if len(modes) != 1:
            raise ValueError(f"name one mode, not {len(modes)} ({', '.join(modes)})")
        mode = modes[0]
        options = value[mode] if value[mode] is not None else {}
        if not isinstance(options, dict):
            raise ValueError(f"{mode}: expected a mapping like {{items: 30}}, got {options!r}")
        if mode == "full" and options:
            raise ValueError("full takes no options")
        allowed = {"subsample": {"items"}, "anchors": {"items", "refresh"}, "racing": {"items", "eta"}}.get(
            mode, set()
        )
        for key in options:
            if key not in allowed:
                raise ValueError(f"{mode}: unknown option {key!r} (it takes: {', '.join(sorted(allowed))})")
        rest = {k: v for k, v in value.items() if k != mode}
        return {"mode": mode, **options, **rest}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        """The schema of every spelling `_spelling` accepts: the full form, a bare mode, `{mode: {options}}`."""
        full = handler(core_schema)
        options = {"items": {"type": "integer", "minimum": 1}, "refresh": {"type": "integer", "minimum": 1},
                   "eta": {"type": "integer", "minimum": 2}}  # fmt: skip
        takes = {
            "full": [],
            "subsample": ["items"],
            "anchors": ["items", "refresh"],
            "racing": ["items", "eta"],
        }
        short = [
            {
                "type": "object",
                "properties": {
                    mode: {"type": ["object", "null"], "properties": {k: options[k] for k in keys},
                           "additionalProperties": False, **({"required": ["items"]} if mode in ("subsample", "anchors") else {})},
                    "rescore_top": {"type": "integer", "minimum": 1},
                },
                "required": [mode],
                "additionalProperties": False,
            }
            for mode, keys in takes.items()
        ]  # fmt: skip
        bare = {"type": "string", "enum": ["full", "racing"], "description": "a mode that needs no size"}
        return {"anyOf": [full, bare, *short], "description": cls.__doc__.split("\n\n")[0]}

    @model_validator(mode="after")
    def _sized(self) -> FidelitySpec:
        if self.mode in ("subsample", "anchors") and self.items is None:
            raise ValueError(
                f"{self.mode} needs items: the number of items per task a candidate is scored on"
            )
        if self.mode == "full" and self.items is not None:
            raise ValueError("full scores every search item: items does not apply")
        return self


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[TaskSpec] = Field(min_length=1)
    include_paths: list[str] = []
    split: SplitSpec = SplitSpec()
    batch_size: int = Field(64, gt=0, description="examples per forward pass; changes no score")
    fidelity: FidelitySpec = FidelitySpec()
    chat_template: bool = Field(
        False,
        description="render every prompt through the tokenizer's chat template (lm-eval's apply_chat_template)",
    )
    fewshot_as_multiturn: bool = Field(
        False, description="with chat_template: few-shot examples as earlier turns of the chat"
    )

    @model_validator(mode="after")
    def _multiturn_needs_chat(self) -> EvaluationSpec:
        if self.fewshot_as_multiturn and not self.chat_template:
            raise ValueError("fewshot_as_multiturn needs chat_template: true (it shapes the chat's turns)")
        return self

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
