"""Score a model directory once (what `evomerge eval` does): load, build the evaluator, evaluate."""

from __future__ import annotations

from evomerge.errors import UserError
from evomerge.evaluate.evaluator import SPLITS, EvalResult, Evaluator
from evomerge.evaluate.spec import EvaluationSpec


def load_model_and_tokenizer(ref: str, *, device: str, dtype: str, trust_remote_code: bool = False):
    from evomerge.models.checkpoint import Checkpoint, parse_dtype
    from evomerge.models.loading import load_target, load_tokenizer

    ckpt = Checkpoint.open(ref)
    model = load_target(ckpt, device=device, dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
    return model, load_tokenizer(ckpt, trust_remote_code=trust_remote_code)


def evaluate_model(
    ref: str,
    tasks: list[str],
    *,
    split: str = "search",
    include_paths: list[str] | None = None,
    heldout: float | int = 0.5,
    split_seed: int = 0,
    limit: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "float32",
) -> EvalResult:
    from pydantic import ValidationError

    from evomerge.device import resolve_device

    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    for option, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    try:
        spec = EvaluationSpec.model_validate(
            {
                "tasks": [{"name": t, "limit": limit} for t in tasks],
                "include_paths": include_paths or [],
                "split": {"heldout": heldout, "seed": split_seed},
                "batch_size": batch_size,
            }
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        option = {"split.heldout": "--heldout", "split.seed": "--split-seed"}.get(where, where)
        raise UserError(f"{option}: {error['msg'].removeprefix('Value error, ')}") from None
    # task names are checked before any model loads
    from evomerge.evaluate.tasks import task_manager

    manager = task_manager(tasks, spec.include_paths)
    from evomerge.evaluate.evaluator import build_tasks

    build_tasks(spec, manager)  # every task problem is reported before the model loads
    model, tokenizer = load_model_and_tokenizer(ref, device=resolve_device(device), dtype=dtype)
    return Evaluator(model, tokenizer, spec, manager).evaluate(split)
