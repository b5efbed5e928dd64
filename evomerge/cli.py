"""Command line: parses arguments, calls the library, maps user errors to one line and exit code 2."""

from __future__ import annotations

import gc
import logging
import os
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
        TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
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
    _say(
        f"merged {summary.tensors} tensors with {summary.method} ({summary.dtype}, "
        f"{summary.bytes / 1e6:.1f} MB) into {summary.out_dir}"
    )


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Model directory (or hub id) to score."),
    task: list[str] = typer.Option(
        ..., "--task", help="Task name (bundled, lm-eval registry, or in --include-path)."
    ),
    split: str = typer.Option("search", help="search | heldout | all"),
    include_path: list[str] = typer.Option([], "--include-path", help="Directory of lm-eval task YAMLs."),
    heldout: str = typer.Option("0.5", help="Held-out share: a fraction in (0, 1) (0.5), or a count (300)."),
    split_seed: int = typer.Option(0, help="Seed of the search/held-out split."),
    limit: int | None = typer.Option(None, help="At most this many examples per task and split."),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N, or auto."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Score a model with the same evaluator the search uses."""
    import json

    from evomerge.evaluate.run import evaluate_model
    from evomerge.evaluate.spec import heldout_share

    try:
        share = heldout_share(heldout)
    except ValueError as exc:
        raise UserError(f"--heldout: {exc}") from None
    result = evaluate_model(
        model, task, split=split, include_paths=include_path, heldout=share,
        split_seed=split_seed, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
    )  # fmt: skip
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return

    _print_table(
        f"{model} ({split} split)",
        ["task", "metric", "value", "examples"],
        [
            [name, key, f"{value:.4f}", str(result.examples[name])]
            for name, metrics in result.metrics.items()
            for key, value in metrics.items()
        ],
    )
    if not result.ok:
        raise UserError(f"evaluation failed: {result.error}")
    _say(f"fitness {result.fitness:.4f} in {result.seconds:.1f}s")


_EVOLVE_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_EVOLVE_ARGS)
def search(
    ctx: typer.Context,
    config: Path = typer.Argument(
        ..., help="Experiment config (YAML), or a mergekit-evolve config (then its flags may follow)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Experiment directory (overrides output.dir)."),
    fresh: bool = typer.Option(False, help="Start over instead of resuming an existing experiment."),
    force: bool = typer.Option(False, help="With --fresh: allow deleting the existing experiment."),
    budget: int | None = typer.Option(None, help="Override optimizer.budget (raise it to extend a run)."),
    executor: str | None = typer.Option(None, help="Override runtime.executor: local or ray."),
    workers: int | None = typer.Option(None, help="Override runtime.ray.workers (with the ray executor)."),
) -> None:
    """Evolve merge recipes; resumes the experiment when its directory exists."""
    from evomerge.experiment import run_search
    from evomerge.progress import SearchReporter
    from evomerge.results import ExperimentView

    if budget is not None and budget < 1:
        raise UserError("--budget must be at least 1")
    if executor not in (None, "local", "ray"):
        raise UserError(f"--executor must be local or ray, not {executor!r}")
    if workers is not None and workers < 1:
        raise UserError("--workers must be at least 1")
    try:
        with SearchReporter(err_console, console) as reporter:
            results = run_search(
                config,
                out=out,
                fresh=fresh,
                force=force,
                budget=budget,
                executor=executor,
                workers=workers,
                reporter=reporter,
                evolve_args=list(ctx.args),
            )
    except KeyboardInterrupt:
        err_console.print(
            "interrupted: every finished evaluation is saved; run the same command to resume", markup=False
        )
        raise typer.Exit(130) from None
    for result in results:
        _print_view(ExperimentView.load(result.dir))
        _say(f"experiment: {result.dir}")


@app.command(context_settings=_EVOLVE_ARGS)
def validate(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Experiment config (YAML), or a mergekit-evolve config."),
) -> None:
    """Check an experiment config (schema, models, tasks) without running it."""
    from evomerge.validate import validate_config

    report = validate_config(config, list(ctx.args))
    for line in report.lines:
        console.print(line, markup=False, highlight=False)
    note = f" ({len(report.unchecked)} hub models or task datasets unchecked)" if report.unchecked else ""
    console.print(f"{config}: valid{note}", markup=False, highlight=False)


@app.command("import", context_settings=_EVOLVE_ARGS)
def import_(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="mergekit-evolve config (YAML); its flags may follow."),
    output: Path = typer.Option(..., "-o", "--output", help="The experiment config to write."),
    force: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
) -> None:
    """Write the evomerge experiment config that a mergekit-evolve config (and its flags) means."""
    from evomerge.migrate import import_config

    for note in import_config(config, output, list(ctx.args), force=force):
        _say(f"note: {note}")
    _say(f"wrote {output}; run it with: evomerge search {output}")


@app.command()
def schema(
    merge: bool = typer.Option(False, "--merge", help="The schema of `evomerge merge` configs instead."),
    evolve: bool = typer.Option(False, "--mergekit-evolve", help="The schema of mergekit-evolve configs."),
) -> None:
    """Print the JSON Schema of experiment configs (or merge configs), for editors and CI checks."""
    import json
    import sys

    from evomerge.schema import evolve_schema, experiment_schema, merge_schema

    if merge and evolve:
        raise UserError("--merge and --mergekit-evolve: choose one")
    chosen = merge_schema() if merge else evolve_schema() if evolve else experiment_schema()
    sys.stdout.write(json.dumps(chosen, indent=2) + "\n")


@app.command()
def report(
    experiments: list[Path] = typer.Argument(..., help="Experiment directories."),
    out: Path | None = typer.Option(
        None, "--out", help="Write the files here instead of into each experiment directory."
    ),
) -> None:
    """Write leaderboard.md, report.html, leaderboard.csv and plots; print the leaderboard."""
    from evomerge.report.render import cross_rows, write_report
    from evomerge.results import ExperimentView
    from evomerge.store import experiment_dirs

    views = []
    for path, from_stages in experiment_dirs(experiments):
        if from_stages and ExperimentView.is_empty(path):  # a stage that has not evaluated anything yet
            _say(f"{path}: no evaluations yet, left out")
            continue
        views.append(ExperimentView.load(path))
    targets = _report_dirs(views, out)
    for view, target in zip(views, targets, strict=True):
        write_report(view, target, views if len(views) > 1 else None)
        _print_view(view)
        _say(f"report: {target / 'report.html'}")
    if len(views) > 1:
        _print_table("all experiments", *cross_rows(views))


def _report_dirs(views, out: Path | None) -> list[Path]:
    """Where each report goes: its experiment's directory, or `out` (one experiment) or a distinct
    subdirectory of `out` per experiment (stages of two staged experiments may share a name)."""
    if out is None:
        return [view.dir for view in views]
    if len(views) == 1:
        return [out]
    names = [view.dir.name for view in views]
    if len(set(names)) < len(names):
        names = [f"{view.dir.parent.name}-{view.dir.name}" for view in views]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 and names.count(name) == 1 else f"{name}-{seen[name]}")
    return [out / name for name in unique]


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _print_view(view) -> None:
    """An experiment's leaderboard: held-out finalists when it has them, else its best candidates."""
    from evomerge.report.render import (
        archive_rows,
        front_rows,
        heldout_rows,
        heldout_warnings,
        paired_rows,
        top_rows,
        view_archive,
    )

    if view.finals:
        _print_table(f"{view.name}: held-out ({len(view.candidates)} evaluations)", *heldout_rows(view))
        for line in heldout_warnings(view):
            _say(line)
        header, rows = paired_rows(view)
        if rows:
            _print_table(f"{view.name}: held-out, item by item", header, rows)
        header, rows, volume = front_rows(view)
        if rows:
            _print_table(f"{view.name}: Pareto front, held-out", header, rows)
            _say(volume)
        archive, best = view_archive(view)
        for title, header, rows in archive_rows(view, archive, best)[:1]:  # best per task; the rest in files
            _print_table(f"{view.name}: {title}", header, rows)
    else:
        _print_table(f"{view.name}: search split (unfinished)", *top_rows(view))


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Every string shown literally: a model called `base[dpo]` or a reason with `[/data/x]` is text,
    not rich markup. Words stay whole: each column is at least as wide as its longest word, and when
    that does not fit the terminal the table is shown one row at a time, field by field."""
    from rich.table import Table
    from rich.text import Text

    from evomerge.files import one_line

    cells = [[one_line(c) for c in header]] + [[one_line(c) for c in row] for row in rows]
    columns = range(len(header))
    longest = [max((len(w) for row in cells for w in row[i].split()), default=1) for i in columns]
    room = console.width - (3 * len(header) + 1)  # borders and padding
    if sum(longest) <= room:
        widths = [max((len(row[i]) for row in cells), default=1) for i in columns]
        while sum(widths) > room:  # narrow the column with the most room above its longest word
            i = max(columns, key=lambda k: widths[k] - longest[k])
            widths[i] -= 1
        table = Table(title=Text(one_line(title)))
        for column, width in zip(cells[0], widths, strict=True):
            table.add_column(Text(column), overflow="fold", width=width)
        for row in cells[1:]:
            table.add_row(*(Text(cell) for cell in row))
        console.print(table)
        return
    for i, row in enumerate(cells[1:], 1):  # narrow terminal: one small table per row
        table = Table(title=Text(f"{one_line(title)} ({i}/{len(rows)})"), show_header=False)
        table.add_column(overflow="fold")
        table.add_column(overflow="fold")
        for name, cell in zip(cells[0], row, strict=True):
            if cell:
                table.add_row(Text(name), Text(cell))
        console.print(table)


@app.command()
def export(
    experiment: Path = typer.Argument(..., help="Experiment directory."),
    out_dir: Path = typer.Argument(..., help="Directory to write the Hugging Face model into."),
    rank: int = typer.Option(1, help="Which candidate: 1 = the best on the search split."),
    candidate: int | None = typer.Option(
        None, help="Which candidate by id (a Pareto front member, as the report names it); overrides --rank."
    ),
    force: bool = typer.Option(False, help="Replace OUT_DIR if it is not empty."),
) -> None:
    """Write a candidate as a model dir with a model card and a mergekit config that rebuilds it."""
    from evomerge.export import export_candidate

    summary = export_candidate(experiment, out_dir, rank=rank, force=force, candidate_id=candidate)
    _say(
        f"exported candidate {summary.candidate} (rank {summary.rank}, {summary.tensors} tensors) to {summary.out_dir}"
    )


def _click_exceptions():
    """click's exception classes, from the copy typer vendors (newer typer) or click itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    # torch, transformers and lm-eval create millions of long-lived objects while they import; at Python's
    # default threshold the collector rescans them all eight times on the way (0.8 s of a search's start-up)
    gc.set_threshold(50_000, 10, 10)
    # lm-eval and transformers draw tqdm bars per batch; tqdm reads this when first imported, which
    # happens lazily inside the commands, after this line
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the terminal gets warnings; a run's log file gets all
        handler.setLevel(logging.WARNING)
    click = _click_exceptions()
    try:
        code = app(standalone_mode=False)  # click's own errors below, as one line like every other
        if isinstance(code, int) and code:  # a command's typer.Exit(code), returned in this mode
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, getattr(click, "Abort", typer.Abort)):
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            console.print(ctx.get_help(), markup=False, highlight=False)
            sys.exit(exc.exit_code)
        names, node = [], ctx
        while node is not None and node.parent is not None:  # the subcommand's name, not how python ran us
            names.insert(0, node.info_name)
            node = node.parent
        hint = f" (see: {' '.join(['evomerge', *names, '--help'])})" if ctx is not None else ""
        message = " ".join(exc.format_message().split())
        err_console.print(f"error: {message}{hint}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except UserError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)
    finally:  # exit without the interpreter's last full collections over what torch & co. allocated (~1 s)
        gc.freeze()


if __name__ == "__main__":
    main()
