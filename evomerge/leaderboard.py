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
    table = Table(title=f"held-out leaderboard ({evaluations} evaluations)")
    for column in ("rank", "model", "held-out fitness", "search fitness", "metrics"):
        table.add_column(column, justify="right" if "fitness" in column or column == "rank" else "left")
    ranked = sorted(finals, key=lambda f: (-f.fitness, f.name))
    for rank, final in enumerate(ranked, 1):
        search = f"{best.fitness:.4f}" if final.kind == "evolved" and best is not None else ""
        value = f"{final.fitness:.4f}" if final.status == "ok" else f"failed: {final.reason}"
        table.add_row(str(rank), final.name, value, search, _metrics(final.metrics, metric_keys))
    console.print(table)


def _metrics(metrics: dict, metric_keys: dict[str, str | None]) -> str:
    parts = []
    for task, values in metrics.items():
        key = metric_keys.get(task) or next(iter(values), None)
        if key in values:
            parts.append(f"{task} {values[key]:.3f}")
    return " ".join(parts)
