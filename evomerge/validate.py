"""`evomerge validate`: check an experiment config without running it.

Local models are opened (headers only) and checked for compatibility; hub ids are looked up when the hub
answers and are reported as unchecked when it does not (an offline machine can still validate a config
meant for a GPU cluster). Tasks are resolved as the search would resolve them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.config import ExperimentConfig
from evomerge.errors import UserError
from evomerge.migrate import load_config as load_evolve_or_experiment
from evomerge.models.reference import looks_like_hub_id


@dataclass
class Validation:
    config: ExperimentConfig
    lines: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    dtype: str | None = None  # runtime.dtype, `auto` resolved when every model was opened
    placement: str | None = None  # runtime.placement, `auto` resolved by the memory plan
    pinned: bool | None = None  # runtime.pin_memory, `auto` resolved by the memory plan (host placement)
    memory: list[str] = field(default_factory=list)  # the memory plan's lines (also among `lines`)


def validate_config(path: str | Path, evolve_args: list[str] | None = None) -> Validation:
    config, config_dir = load_evolve_or_experiment(path, evolve_args)
    return check_config(config, config_dir, resolve=False)


def _check_ranks(config: ExperimentConfig, first, count: int) -> None:
    """Methods that keep rank // models singular directions of each matrix (tsv_m) cannot merge a matrix
    of lower rank than the number of models: refused before anything is created, naming the tensor."""
    methods = [m for m in [config.merge.method, *config.merge.baselines] if m.value == "tsv_m"]
    if not methods or config.dfs is not None:
        return
    from evomerge.merge.methods.tsv_m import check_rank

    for name, info in first.tensors.items():
        if not any(part in name for part in config.merge.exclude):
            check_rank(info.shape, count, f"tensor {name}")


def check_config(config: ExperimentConfig, config_dir: Path, *, resolve: bool) -> Validation:
    """Everything about an experiment that can be checked before it runs, each problem one UserError:
    models (headers: found, compatible, base not also a source, no source twice), tasks (data loads,
    metrics, split sizes, few-shot splits), the device, the optimizer (name, replayable), the round size.
    `resolve`: hub ids must resolve (the search needs them); otherwise an unreachable hub id is reported
    as unchecked (an offline machine can validate a config meant for a GPU cluster). Creates nothing."""
    from evomerge.config import PREVIOUS
    from evomerge.evaluate.evaluator import TaskDataUnreachable, build_tasks, check_length_tasks
    from evomerge.evaluate.tasks import task_manager
    from evomerge.models.checkpoint import Checkpoint
    from evomerge.models.compat import check_compatible
    from evomerge.models.reference import cached_snapshot

    report = Validation(config)
    sources = [s for s in config.models.sources]
    for stage in config.stages or []:
        sources += [s for s in stage.sources or [] if s != PREVIOUS and s not in sources]
    refs = ([config.models.base] if config.models.base else []) + sources
    local, num_layers, where = [], None, {}
    for ref in refs:
        if resolve or _is_local(ref, config_dir) or not looks_like_hub_id(ref) or cached_snapshot(ref):
            ckpt = Checkpoint.open(ref, base_dir=config_dir)
            local.append(ckpt)
            where[ref] = ckpt.path.resolve()
            continue
        state = _hub_status(ref)
        if state == "unreachable":
            report.unchecked.append(ref)
        report.lines.append(
            f"model {ref}: {'hub id, unchecked (hub unreachable)' if state == 'unreachable' else 'found on the hub'}"
        )
    _distinct_models(config, where)
    if local:
        check_compatible(local)
        num_layers = local[0].num_layers
        _check_ranks(config, local[0], len(config.models.sources))
        for ckpt in local:
            report.lines.append(
                f"model {ckpt.ref}: {ckpt.model_type}, {ckpt.num_layers} layers, {len(ckpt.tensors)} tensors"
            )
        if len(local) < len(refs):
            report.lines.append(
                "compatibility between local and hub models is checked when the search starts"
            )
    report.lines.append(_dtype_line(config, local, len(local) == len(refs), report))
    if resolve and config.runtime.executor == "local":  # validate may run on another machine than the search
        from evomerge.device import resolve_device

        resolve_device(config.runtime.device)
    if resolve and config.runtime.executor == "ray" and config.runtime.ray.address is None:
        from evomerge.runtime.ray_executor import check_private_cluster_auth

        check_private_cluster_auth()
    manager = task_manager([t.name for t in config.evaluation.tasks], config.evaluation.include_paths)
    try:
        task_dict, splits = build_tasks(config.evaluation, manager)
        _check_fidelity(config, task_dict, splits)
        check_length_tasks(config.length_tasks(), task_dict)
        sizes = ", ".join(
            f"{name} ({len(split['search'])} search / {len(split['heldout'])} held-out)"
            for name, split in splits.items()
        )
        report.lines.append(f"tasks: {sizes}")
        from evomerge.evaluate.spec import small_heldout_warnings

        limits = {t.name: t.limit for t in config.evaluation.tasks}
        report.lines += small_heldout_warnings(
            {
                n: len(split["heldout"][: limits.get(n)] if limits.get(n) else split["heldout"])
                for n, split in splits.items()
            }
        )
        if local and len(local) == len(refs):
            report.lines += _memory_lines(config, config_dir, task_dict, report)
    except TaskDataUnreachable as exc:
        if resolve:
            raise
        report.unchecked += [t.name for t in config.evaluation.tasks]
        report.lines.append(f"tasks: found, data unchecked (the hub is unreachable: {exc})")
    if num_layers is None:
        num_layers = _hub_num_layers(refs[0], offline=refs[0] in report.unchecked)
    for i, stage in enumerate(config.stages or []):
        stage_config = config.stage_config(i, None)
        report.lines.append(f"stage {stage.name}: " + _search_line(stage_config, num_layers))
    if not config.stages:
        report.lines.append("search: " + _search_line(config, num_layers))
    return report


def _memory_lines(
    config: ExperimentConfig, config_dir: Path, task_dict: dict, report: Validation
) -> list[str]:
    """The memory plan of one worker (the first stage's, for a staged experiment); UserError when it
    fits neither the device's free memory nor host RAM."""
    from evomerge.device import dtype_device
    from evomerge.models.loading import open_models
    from evomerge.runtime.memory import plan_for_config

    planned = config.stage_config(0, None) if config.stages else config
    base, sources, family = open_models(planned, config_dir)
    scores_logprobs = any(
        getattr(task, "OUTPUT_TYPE", None) in ("loglikelihood", "loglikelihood_rolling", "multiple_choice")
        for task in task_dict.values()
    )
    plan = plan_for_config(
        planned, base, sources, family, dtype=report.dtype or "float32", loglikelihood=scores_logprobs,
        device=dtype_device(config.runtime.device),
    )  # fmt: skip
    report.placement, report.memory = plan.placement, plan.lines()
    report.pinned = plan.pinned if plan.placement == "host" and plan.device != "cpu" else None
    return report.memory


def _dtype_line(config: ExperimentConfig, local: list, all_local: bool, report: Validation) -> str:
    from evomerge.device import dtype_device
    from evomerge.models.checkpoint import auto_dtype

    report.dtype = config.runtime.dtype
    if report.dtype != "auto":
        return f"dtype: {report.dtype} (runtime.dtype; merge math in float32)"
    if not all_local:
        return "dtype: auto (chosen from the checkpoints' headers when the search starts)"
    report.dtype = auto_dtype(local, dtype_device(config.runtime.device))
    stored = ", ".join(sorted({str(c.stored_dtype) for c in local}))
    return f"dtype: {report.dtype} (auto; the checkpoints store {stored}; merge math in float32)"


def _check_fidelity(config: ExperimentConfig, task_dict: dict, splits: dict) -> None:
    """The fidelity mode fits the tasks: its item count is within every task's search split, and modes
    that add up per-item results (anchors, racing) have them."""
    from evomerge.evaluate.evaluator import limited, per_item_mean

    fidelity = config.evaluation.fidelity
    if fidelity.mode == "full":
        return
    for spec in config.evaluation.tasks:
        size = len(limited(splits[spec.name]["search"], spec.limit))
        if fidelity.items is not None and fidelity.items > size:
            raise UserError(
                f"evaluation.fidelity: {fidelity.mode} items {fidelity.items} is more than the search split "
                f"of {spec.name} ({size} items)"
            )
        if fidelity.mode in ("anchors", "racing") and not per_item_mean(task_dict[spec.name], spec.metric):
            metric = spec.metric or "its first metric"
            raise UserError(
                f"evaluation.fidelity: {fidelity.mode} adds up per-item results, but task {spec.name} "
                f"reports {metric} only as an aggregate over items (not a mean); use subsample or full"
            )


def _distinct_models(config: ExperimentConfig, where: dict[str, Path]) -> None:
    """The base is not also a source, and no source is listed twice, after resolving paths (`zoo/a` and
    `./zoo/a/` are one model)."""
    base = where.get(config.models.base) if config.models.base else None
    lists = [("models.sources", config.models.sources)] + [
        (f"stages ({s.name}).sources", s.sources) for s in config.stages or [] if s.sources
    ]
    for key, refs in lists:
        seen: dict[Path, str] = {}
        for ref in refs:
            path = where.get(ref)
            if path is None:
                continue
            if base is not None and path == base:
                raise UserError(f"{key}: {ref} is the base model ({config.models.base}) itself")
            if path in seen:
                raise UserError(f"{key}: {ref} and {seen[path]} are the same model ({path})")
            seen[path] = ref


def _search_line(config: ExperimentConfig, num_layers: int | None) -> str:
    from evomerge.search.space import Space

    if num_layers:
        if config.dfs is not None:
            from evomerge.search.dfs_space import DfsSpace

            space = DfsSpace(config.dfs, [num_layers] * len(config.models.sources), config.dfs_ends())
        elif config.mergekit_genome is not None:
            from evomerge.search.evolve_space import EvolveSpace

            space = EvolveSpace(config, num_layers)
        else:
            space = Space(config.space, config.merge.method, len(config.models.sources), num_layers)
        from evomerge.search.optimizers import check_replayable, round_size
        from evomerge.search.schedule import resolve_overlap

        popsize = round_size(config.optimizer, space.default_popsize())
        _check_round_memory(config, popsize, space.size)
        overlap = resolve_overlap(config.optimizer, popsize)
        check_replayable(config.optimizer, space.size, space.default_popsize(), overlap)
        rounds = math.ceil(config.optimizer.budget / popsize)
        kind = (
            "data-flow space" if config.dfs else f"mergekit-evolve genotype {'x'.join(map(str, space.shape))}"
            if config.mergekit_genome else f"{len(space.blocks)} blocks"
        )  # fmt: skip
        runtime = config.runtime
        where = "local executor" if runtime.executor == "local" else "Ray executor"
        if runtime.executor == "ray":
            where += f", {runtime.ray.workers or 'auto'} workers"
        from evomerge.search.modes import MODES

        fidelity = config.evaluation.fidelity
        fitness = MODES[fidelity.mode].summary(fidelity)
        return (
            f"{space.size} genes ({kind}), {config.optimizer.name} with {popsize} candidates per round "
            f"({overlap} asked ahead), budget {config.optimizer.budget} ({rounds} rounds), {fitness}, {where}"
        )
    if config.optimizer.name == "nevergrad":
        from evomerge.search.optimizers import check_nevergrad_name

        check_nevergrad_name(config.optimizer.optimizer)
    return "number of layers unknown until the models are reachable"


_OPTIMIZER_COPIES = 8  # cma holds a round's genomes several times over (asked, clipped, sorted, told)


def _check_round_memory(config: ExperimentConfig, popsize: int, genes: int) -> None:
    """A round's genomes must fit in a quarter of the host's RAM (the rest is the models' and the
    evaluation's): 1e8 candidates per round is otherwise an out-of-memory kill mid-search."""
    import psutil

    need = popsize * max(genes, 1) * 8 * _OPTIMIZER_COPIES
    allowed = psutil.virtual_memory().total // 4
    if need > allowed:
        key = "popsize" if config.optimizer.name == "cma" else "batch"
        raise UserError(
            f"optimizer.{key}: {popsize} candidates per round of {genes} genes need about "
            f"{need / 2**30:.1f} GiB of host memory for the optimizer alone (a quarter of this machine's RAM "
            f"is {allowed / 2**30:.1f} GiB); use a smaller {key}"
        )


def _is_local(ref: str, config_dir: Path) -> bool:
    return Path(ref).expanduser().is_dir() or (not Path(ref).is_absolute() and (config_dir / ref).is_dir())


def _hub_status(ref: str) -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "unreachable"
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        HfApi().model_info(ref, timeout=5)
        return "found"
    except RepositoryNotFoundError:
        raise UserError(f"model {ref}: no such repository on the Hugging Face hub") from None
    except Exception:
        return "unreachable"


def _hub_num_layers(ref: str, offline: bool) -> int | None:
    """num_hidden_layers from the model's config.json (cached, or fetched when the hub answers)."""
    import json

    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(ref, "config.json", local_files_only=offline)
        return int(json.loads(Path(path).read_text()).get("num_hidden_layers", 0)) or None
    except Exception:  # not cached and no hub: the gene count waits for the search
        return None
