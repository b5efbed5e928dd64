"""The leaderboard a finished search prints: every finalist on the held-out split, best first."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from evomerge.store import Candidate, Final


def print_leaderboard(
    console: Console,
    finals: list[Final],
    best: Candidate | None,
    evaluations: int,
    metric_keys: dict[str, str | None],
) -> None:
    """`metric_keys`: the metric each task contributes to fitness (None: its first)."""
    if not finals:
        if best is not None:
            console.print(
                f"{evaluations} evaluations so far; best search fitness {best.fitness:.4f} (candidate {best.id})"
            )
        return
    tasks = list(metric_keys)
    table = Table(title=f"held-out leaderboard ({evaluations} evaluations)")
    for column in ("rank", "model", "held-out fitness", "search fitness", *tasks):
        table.add_column(column, justify="left" if column == "model" else "right")
    ranked = sorted(finals, key=lambda f: (-f.fitness, f.name))
    for rank, final in enumerate(ranked, 1):
        search = f"{best.fitness:.4f}" if final.kind == "evolved" and best is not None else ""
        value = f"{final.fitness:.4f}" if final.status == "ok" else f"failed: {final.reason}"
        cells = [_metric(final.metrics, task, metric_keys[task]) for task in tasks]
        table.add_row(str(rank), final.name, value, search, *cells)
    console.print(table)


def _metric(metrics: dict, task: str, key: str | None) -> str:
    values = metrics.get(task, {})
    key = key or next(iter(values), None)
    return f"{values[key]:.4f}" if key in values else ""
