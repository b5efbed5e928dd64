"""Search progress for people: a rich bar on a terminal (done/budget, best, evals/min, ETA), plain log
lines elsewhere (CI logs, `nohup`, files)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from evomerge.files import one_line
from evomerge.store import Candidate


class SearchReporter:
    def __init__(self, console: Console, out: Console | None = None) -> None:
        self.console = console
        self.out = out or console  # notes (the memory plan) go with the results, not the progress
        self.tty = console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self.started = time.monotonic()
        self.start_done = 0
        self.budget = 0

    def __enter__(self) -> SearchReporter:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def stage(self, text: str) -> None:
        text = one_line(text)
        if self.progress is not None:
            self.progress.update(self.task, description=text)
        else:
            self.console.print(text, markup=False, highlight=False)

    def note(self, text: str) -> None:
        self.out.print(text, markup=False, highlight=False, soft_wrap=True)

    def start(self, done: int, budget: int, best: str | None) -> None:
        self.started, self.start_done, self.budget = time.monotonic(), done, budget
        if done:
            self.console.print(
                f"resuming: {done} of {budget} evaluations in the journal", markup=False, highlight=False
            )
        if not self.tty:
            return
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"), TextColumn("{task.fields[rate]} evals/min"),
            TextColumn("{task.fields[items]} item-evals"),
            TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task(
            "searching", total=budget, completed=min(done, budget), best=_fmt(best), rate="-", items="-"
        )

    def evaluated(self, candidate: Candidate, done: int, best: str | None, item_evals: int = 0) -> None:
        elapsed = time.monotonic() - self.started
        rate = (done - self.start_done) / elapsed * 60 if elapsed > 0 else 0.0
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=min(done, self.budget),
                description="searching",
                best=_fmt(best),
                rate=f"{rate:.1f}",
                items=_count(item_evals),
            )
            return
        what = "estimate" if candidate.estimate else "fitness"
        state = f"{what} {candidate.fitness:.4f}" if candidate.ok else f"failed: {one_line(candidate.reason)}"
        self.console.print(
            f"[{done}/{self.budget}] candidate {candidate.generation}.{candidate.idx} {state} | best {_fmt(best)} "
            f"| {rate:.1f} evals/min | {_count(item_evals)} item-evals",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def _fmt(value: float | str | None) -> str:
    """A fitness; a string comes marked already (an estimate is `~0.1234`, as in every report)."""
    if isinstance(value, str):
        return value
    return "-" if value is None else f"{value:.4f}"
