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

from evomerge.config import ExperimentConfig, load_config
from evomerge.errors import UserError
from evomerge.models.reference import looks_like_hub_id


@dataclass
class Validation:
    config: ExperimentConfig
    lines: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)


def validate_config(path: str | Path) -> Validation:
    from evomerge.evaluate.tasks import task_manager
    from evomerge.models.checkpoint import Checkpoint
    from evomerge.models.compat import check_compatible

    config, config_dir = load_config(path)
    report = Validation(config)
    refs = ([config.models.base] if config.models.base else []) + list(config.models.sources)
    local, num_layers = [], None
    for ref in refs:
        if _is_local(ref, config_dir) or not looks_like_hub_id(ref):
            local.append(Checkpoint.open(ref, base_dir=config_dir))
            continue
        state = _hub_status(ref)
        if state == "unreachable":
            report.unchecked.append(ref)
        report.lines.append(
            f"model {ref}: {'hub id, unchecked (hub unreachable)' if state == 'unreachable' else 'found on the hub'}"
        )
    if local:
        check_compatible(local)
        num_layers = local[0].num_layers
        for ckpt in local:
            report.lines.append(
                f"model {ckpt.ref}: {ckpt.model_type}, {ckpt.num_layers} layers, {len(ckpt.tensors)} tensors"
            )
        if len(local) < len(refs):
            report.lines.append(
                "compatibility between local and hub models is checked when the search starts"
            )
    task_manager([t.name for t in config.evaluation.tasks], config.evaluation.include_paths)
    report.lines.append("tasks: " + ", ".join(t.name for t in config.evaluation.tasks) + " (found)")
    if num_layers is None:
        num_layers = _hub_num_layers(refs[0], offline=refs[0] in report.unchecked)
    for i, stage in enumerate(config.stages or []):
        stage_config = config.stage_config(i, None)
        report.lines.append(f"stage {stage.name}: " + _search_line(stage_config, num_layers))
    if not config.stages:
        report.lines.append("search: " + _search_line(config, num_layers))
    return report


def _search_line(config: ExperimentConfig, num_layers: int | None) -> str:
    from evomerge.search.space import Space

    if num_layers:
        if config.dfs is not None:
            from evomerge.search.dfs_space import DfsSpace

            space = DfsSpace(config.dfs, [num_layers] * len(config.models.sources))
        else:
            space = Space(config.space, config.merge.method, len(config.models.sources), num_layers)
        from evomerge.search.optimizers import round_size
        from evomerge.search.run import resolve_overlap

        popsize = round_size(config.optimizer, space.default_popsize())
        overlap = resolve_overlap(config.optimizer, popsize)
        rounds = math.ceil(config.optimizer.budget / popsize)
        kind = "data-flow space" if config.dfs else f"{len(space.blocks)} blocks"
        runtime = config.runtime
        where = "local executor" if runtime.executor == "local" else "Ray executor"
        if runtime.executor == "ray":
            where += f", {runtime.ray.workers or 'auto'} workers"
        return (
            f"{space.size} genes ({kind}), {config.optimizer.name} with {popsize} candidates per round "
            f"({overlap} asked ahead), budget {config.optimizer.budget} ({rounds} rounds), {where}"
        )
    return "number of layers unknown until the models are reachable"


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
