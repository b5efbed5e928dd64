"""`evomerge search` around the loop: the experiment directory (created, locked, resumed or started over),
its store and log, the stages of a staged experiment, and the command's runtime overrides. The loop itself
(search/run.py) sees an open store and a config, nothing of directories.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from evomerge.config import ExperimentConfig, describe_changes
from evomerge.errors import UserError
from evomerge.files import EXPERIMENT, LOCK, STAGED, DirectoryLock, check_deletable, marked_as, open_append
from evomerge.migrate import load_config as load_evolve_or_experiment
from evomerge.search.run import Reporter, Search, SearchInputs
from evomerge.store import Candidate, ExperimentStore, Final, mark_staged

log = logging.getLogger("evomerge.search")


@dataclass
class SearchResult:
    dir: Path
    evaluations: int
    budget: int
    best: Candidate | None
    finals: list[Final] = field(default_factory=list)
    resumed: bool = False


def open_experiment(
    config: ExperimentConfig, config_text: str, out: Path, *, config_dir: Path | None = None
) -> tuple[ExperimentStore, bool, list[str]]:
    """(store, resumed, notes): the experiment store at `out` (created and locked by the caller), opened
    to resume after checking that the config still defines the same search, or created; the notes are
    what the resume found worth saying (models whose tokenizer an older evomerge did not record)."""
    from evomerge.models.identity import check_same_models, describe_models
    from evomerge.models.loading import open_models

    identity = config.identity()
    snapshot = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    base, sources, _ = open_models(config, config_dir)
    models = describe_models(base, sources)
    if ExperimentStore.exists(out):
        store = ExperimentStore.open(out)
        try:
            old, recorded = store.meta_json("identity", {}), store.meta_json("models")
            if not isinstance(old, dict) or not (recorded is None or isinstance(recorded, dict)):
                raise UserError(f"{out}: the journal's identity or model record is damaged")
            old, new = _comparable(old), _comparable(identity)
        except UserError:
            store.close()
            raise
        try:
            if old != new:
                changed = ", ".join(describe_changes(old, new)) or "the config"
                raise UserError(
                    f"{out} holds an experiment with a different config (changed: {changed}); "
                    "resume with the original config, or start over with --fresh --force or another --out"
                )
            notes = check_same_models(recorded, models, out) if recorded is not None else []
        except UserError:
            store.close()
            raise
        if (
            recorded is None or notes
        ):  # made before models (or tokenizers) were recorded: from now on they are
            store.set_meta("models", json.dumps(models, sort_keys=True))
        if store.meta("config") != snapshot:
            store.set_meta("config", snapshot)
        if config_dir is not None and store.meta("config_dir") != str(config_dir):
            store.set_meta("config_dir", str(config_dir))
        return store, True, notes
    meta = {
        "identity": json.dumps(identity, sort_keys=True),
        "identity_hash": config.identity_hash(),
        "config": snapshot,
        "config_dir": str(config_dir or Path.cwd()),  # where relative model paths may resolve (export)
        "models": json.dumps(models, sort_keys=True),
    }
    return ExperimentStore.create(out, meta, config_text=config_text), False, []


def search_inputs(config: ExperimentConfig, config_dir: Path | None) -> SearchInputs:
    """What the loop needs of the models (their headers) and the tasks, from the modules that own them."""
    from evomerge.evaluate.evaluator import search_items
    from evomerge.evaluate.tasks import task_manager
    from evomerge.models.loading import open_models
    from evomerge.search.modes import MODES

    manager = task_manager([t.name for t in config.evaluation.tasks], config.evaluation.include_paths)
    base, sources, _ = open_models(config, config_dir)
    items = None
    if MODES[config.evaluation.fidelity.mode].uses_items:
        items = search_items(config.evaluation, manager)
    return SearchInputs((base or sources[0]).num_layers, [s.num_layers for s in sources], manager, items)


def _comparable(identity: dict) -> dict:
    """An identity as resume compares it: None entries dropped (an optional key added to the schema later
    must not make older experiments look changed) and settings that change no result left out (older
    experiments recorded evaluation.batch_size)."""
    data = _pruned(identity)
    if isinstance(data.get("evaluation"), dict):
        data["evaluation"] = {k: v for k, v in data["evaluation"].items() if k != "batch_size"}
    return data


def _pruned(value):
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def run_search(
    config_path: str | Path,
    *,
    out: str | Path | None = None,
    fresh: bool = False,
    force: bool = False,
    budget: int | None = None,
    executor: str | None = None,
    workers: int | None = None,
    reporter: Reporter | None = None,
    evolve_args: list[str] | None = None,
) -> list[SearchResult]:
    """One result per stage (one for a plain experiment). `executor` and `workers` override the runtime
    section (they change where candidates run, never which candidates run).

    Order of work: an existing experiment is locked first (a second writer stops at once); then the whole
    config is checked (models, tasks, optimizer...) before anything is created or deleted; then the
    directory is created (or, with --fresh --force, the marked experiment in it deleted) and locked."""
    from evomerge.runtime.plan import resolve_runtime
    from evomerge.validate import check_config

    config, config_dir = load_evolve_or_experiment(config_path, evolve_args)
    config = _override_runtime(config, executor, workers)
    out = Path(out if out is not None else config.output.dir)  # relative to the working directory
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    staged = bool(config.stages)
    what = "staged experiment" if staged else "experiment"
    lock = DirectoryLock(out, what) if _existing(out, config) else None
    try:
        checked = check_config(config, config_dir, resolve=True)
        auto_dtype = config.runtime.dtype == "auto"
        config = resolve_runtime(config, checked).apply(config)  # journaled as resolved
        if lock is None and _existing(out, config):  # another search created it while this one validated
            lock = DirectoryLock(out, what)  # refused at once, naming the holder, if it still runs
        if lock is None:
            _check_new_target(out, staged)
            out.mkdir(parents=True, exist_ok=True)
            lock = DirectoryLock(out, what)
        run = _Run(fresh, force, budget, reporter, auto_dtype, tuple(checked.memory))
        if not staged:
            return [_run_one(config, config_dir, out, run)]
        return _run_stages(config, config_dir, out, run)
    finally:
        if lock is not None:
            lock.close()


@dataclass(frozen=True)
class _Run:
    """How `evomerge search` was asked to run, as every experiment (or stage) of it sees it."""

    fresh: bool
    force: bool
    budget: int | None
    reporter: Reporter | None
    auto_dtype: bool = False  # runtime.dtype was auto: an experiment resumes with the dtype it journaled
    notes: tuple[str, ...] = ()  # for search.log (the memory plan)


def _with_runtime(config: ExperimentConfig, **changes) -> ExperimentConfig:
    return config.model_copy(update={"runtime": config.runtime.model_copy(update=changes)})


def _journaled_dtype(out: Path) -> str | None:
    store = ExperimentStore.open(out, readonly=True)
    try:
        config = store.meta_json("config", {})
        runtime = config.get("runtime") if isinstance(config, dict) else None
        return runtime.get("dtype") if isinstance(runtime, dict) else None
    finally:
        store.close()


def _existing(out: Path, config: ExperimentConfig) -> bool:
    """Whether `out` already holds this kind of experiment (so its lock can be taken before any check)."""
    if not out.is_dir():
        return False
    if config.stages:
        return marked_as(out, STAGED) or _old_staged(out, config)
    return ExperimentStore.exists(out) or marked_as(out, EXPERIMENT)


def _old_staged(out: Path, config: ExperimentConfig) -> bool:
    """A staged experiment made before markers existed: nothing in it but this config's stage dirs, each
    holding an experiment."""
    names = {s.name for s in config.stages or []}
    entries = [p for p in out.iterdir() if p.name != LOCK]
    return bool(entries) and all(p.name in names and ExperimentStore.exists(p) for p in entries)


def _check_new_target(out: Path, staged: bool) -> None:
    if staged:
        if out.exists() and any(out.iterdir()):
            raise UserError(
                f"{out} exists, is not empty and is not a staged experiment; choose another --out"
            )
    elif not ExperimentStore.is_fresh_dir(out):
        raise UserError(f"{out} exists, is not empty and is not an experiment; choose another --out")


def _run_stages(config: ExperimentConfig, config_dir: Path, out: Path, run: _Run) -> list[SearchResult]:
    """Each stage is an experiment in `out/<stage>`; `previous` is the prior stage's best, exported once."""
    from evomerge.files import remove_marked

    stage_dirs = [p for p in out.iterdir() if p.is_dir() and ExperimentStore.exists(p)]
    if run.fresh and stage_dirs:
        if not run.force:
            raise UserError(
                f"{out} holds a staged experiment; --fresh would delete it: add --force to confirm"
            )
        for child in stage_dirs:
            check_deletable(child, EXPERIMENT)  # all checked before the first is deleted
        for child in stage_dirs:
            remove_marked(child, EXPERIMENT)
    mark_staged(out, [s.name for s in config.stages])
    results, previous = [], None
    for index, stage in enumerate(config.stages):
        stage_config = config.stage_config(index, previous)
        stage_dir = out / stage.name
        stage_dir.mkdir(exist_ok=True)
        with DirectoryLock(stage_dir, "experiment"):  # --fresh was handled above, for all stages at once
            result = _run_one(
                stage_config,
                config_dir,
                stage_dir,
                replace(run, fresh=False, force=False, notes=() if index else run.notes),
            )
        results.append(result)
        if not result.finals:
            break
        previous = (stage_dir / f"{stage.name}-best").resolve()
        _hand_on(config, index, out, previous, run)
    return results


def _hand_on(config: ExperimentConfig, index: int, out: Path, handoff: Path, run: _Run) -> None:
    """Keep stage `index`'s exported best (`handoff`, the next stage's source) its current best: a stage
    extended with --budget may have a new winner. When it changed, it is exported again, and later stages
    that already ran on the old one are set aside (renamed, never deleted) so they start over on the new."""
    from evomerge.export import export_candidate
    from evomerge.files import MODEL, mark, marker

    stage = config.stages[index]
    store = ExperimentStore.open(out / stage.name, readonly=True)
    try:
        winner = store.winner()
    finally:
        store.close()
    recorded = (marker(handoff) or {}).get("candidate") if handoff.exists() else None
    if winner is None:
        return
    if recorded == winner.id:
        _stage_log(
            out / stage.name, f"stage {stage.name} hands on its best, candidate {winner.id} ({handoff})"
        )
        return
    if recorded is None and handoff.exists():
        message = f"stage {stage.name}: exporting its best (candidate {winner.id}) again, as this evomerge records which"
    elif recorded is None:
        message = f"exporting the best of stage {stage.name} (candidate {winner.id})"
    else:
        message = (
            f"stage {stage.name}'s best is now candidate {winner.id} (was {recorded}): exporting it again"
        )
    _stage_log(out / stage.name, message)
    if run.reporter:
        run.reporter.stage(message)
    export_candidate(out / stage.name, handoff, force=handoff.exists())
    mark(handoff, MODEL, candidate=winner.id)
    if recorded is None:
        return
    for later in config.stages[index + 1 :]:
        stage_dir = out / later.name
        if not ExperimentStore.exists(stage_dir):
            continue
        aside = out / f"{later.name}.on-{stage.name}-candidate-{recorded}"
        suffix = 1
        while aside.exists():
            suffix += 1
            aside = out / f"{later.name}.on-{stage.name}-candidate-{recorded}-{suffix}"
        stage_dir.rename(aside)
        note = f"stage {later.name} ran on the old best of stage {stage.name}: kept as {aside.name}, starting over"
        _stage_log(out / stage.name, note)
        if run.reporter:
            run.reporter.note(note)


def _stage_log(stage_dir: Path, message: str) -> None:
    """A line in a stage's search.log (the stage's own run has closed its log handler by now)."""
    import time

    with open_append(stage_dir / "search.log") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO evomerge.search: {message}\n")


def _override_runtime(
    config: ExperimentConfig, executor: str | None, workers: int | None
) -> ExperimentConfig:
    if executor is None and workers is None:
        return config
    data = config.model_dump(mode="json")
    if executor is not None:
        data["runtime"]["executor"] = executor
    if workers is not None:
        if data["runtime"]["executor"] != "ray":
            raise UserError("--workers applies to the ray executor: add --executor ray")
        data["runtime"]["ray"]["workers"] = workers
    return ExperimentConfig.model_validate(data)


def _run_one(config: ExperimentConfig, config_dir: Path, out: Path, run: _Run) -> SearchResult:
    """One experiment in `out`, which exists and whose `DirectoryLock` the caller holds."""
    from evomerge.files import remove_marked

    if run.budget is not None:
        config = config.model_copy(
            update={"optimizer": config.optimizer.model_copy(update={"budget": run.budget})}
        )
    if run.fresh and ExperimentStore.exists(out):
        if not run.force:
            raise UserError(f"{out} holds an experiment; --fresh would delete it: add --force to confirm")
        remove_marked(out, EXPERIMENT, spare=(LOCK,))  # refuses an unmarked dir, `.`, the cwd...
    if not ExperimentStore.exists(out) and not ExperimentStore.is_fresh_dir(out):
        raise UserError(f"{out} exists, is not empty and is not an experiment; choose another --out")
    notes = list(run.notes)
    if run.auto_dtype and ExperimentStore.exists(out):  # auto chose once (this machine may choose otherwise)
        journaled = _journaled_dtype(out)
        if journaled not in (None, "auto", config.runtime.dtype):
            notes.append(f"runtime.dtype auto: resuming with the journaled {journaled}")
            config = _with_runtime(config, dtype=journaled)
    store, resumed, opened = open_experiment(
        config,
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
        out,
        config_dir=config_dir,
    )
    notes += opened  # shown with the run's other notes once its log is open
    handler = logging.StreamHandler(open_append(out / "search.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("evomerge")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        log.info(
            "%s experiment %s (config %s)", "resuming" if resumed else "starting", out, config.identity_hash()
        )
        for note in notes:  # once the experiment is open (its checks passed), so search.log has them too
            log.info("%s", note.strip())
            if run.reporter:
                run.reporter.note(note)
        search = Search(config, config_dir, store, search_inputs(config, config_dir), run.reporter)
        try:
            search.run()
            done = store.count()
            finals = search.finish() if done >= config.optimizer.budget else []
        finally:
            search.close()
        return SearchResult(out, done, config.optimizer.budget, store.best(), finals, resumed)
    finally:
        root.removeHandler(handler)
        handler.stream.close()
        store.close()
