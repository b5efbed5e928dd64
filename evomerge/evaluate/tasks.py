"""Find tasks by name: bundled tasks, the user's task dirs, and only if needed lm-eval's own registry
(indexing its ~15k tasks takes about 10 s, so it is skipped when every task is local)."""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

from evomerge.errors import UserError

BUNDLED = Path(__file__).resolve().parent.parent / "tasks"


def go_offline() -> None:
    """Local tasks need no network; without this `datasets` sends a HEAD request per task load."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "datasets" in sys.modules:  # already imported: its config read the environment at import time
        import datasets

        datasets.config.HF_HUB_OFFLINE = True


def task_manager(names: list[str], include_paths: list[str] | None = None):
    """A TaskManager that knows every name in `names`; raises UserError with suggestions otherwise."""
    paths = [str(BUNDLED)] + [str(Path(p).expanduser().resolve()) for p in include_paths or []]
    for path in paths[1:]:
        if not Path(path).is_dir():
            raise UserError(f"task include_path not found: {path}")
    local = _manager(paths, include_defaults=False)
    if all(name in local.all_tasks for name in names):
        go_offline()
        return local
    full = _manager(paths, include_defaults=True)
    for name in names:
        if name not in full.all_tasks:
            close = difflib.get_close_matches(name, full.all_tasks, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown task {name!r}{hint}")
    return full


def _manager(paths: list[str], include_defaults: bool):
    import logging

    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=paths, include_defaults=include_defaults, verbosity="ERROR")
