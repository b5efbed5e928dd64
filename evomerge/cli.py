"""Command line: parses arguments, calls the library, maps user errors to one line and exit code 2."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evomerge.errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Evolutionary search for model-merging recipes.",
)  # fmt: skip
err_console = Console(stderr=True)
console = Console()


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, disable=not err_console.is_terminal,
    )  # fmt: skip


@app.callback()
def _root() -> None:
    """Evolutionary search for model-merging recipes."""


@app.command()
def merge(
    config: Path = typer.Argument(..., help="mergekit-style merge config (YAML)."),
    out_dir: Path = typer.Argument(..., help="Directory to write the merged Hugging Face model into."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N, or auto (cuda when available)."),
    force: bool = typer.Option(False, help="Replace OUT_DIR if it is not empty."),
    allow_pickle: bool = typer.Option(
        False, help="Accept .bin (pickle) checkpoints, loaded with weights_only=True."
    ),
) -> None:
    """Merge models as a mergekit config describes, exactly, into OUT_DIR."""
    from evomerge.device import resolve_device
    from evomerge.merge.offline import merge_from_config

    with _progress() as progress:
        summary = merge_from_config(
            config,
            out_dir,
            device=resolve_device(device),
            force=force,
            allow_pickle=allow_pickle,
            progress=progress,
        )
    console.print(
        f"merged {summary.tensors} tensors with {summary.method} ({summary.dtype}, "
        f"{summary.bytes / 1e6:.1f} MB) into {summary.out_dir}"
    )


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
