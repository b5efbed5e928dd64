"""`evomerge merge`: run a mergekit-style config exactly, tensor by tensor, into a model directory.

This path is for reproducing a recipe, not for the search: it uses the exact kernels (true top-k) and
streams one tensor at a time, so memory stays at one tensor per model plus one output shard.
"""

from __future__ import annotations

import filecmp
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import UserError
from evomerge.files import atomic_write
from evomerge.merge.mergekit_config import ConfigPlan, load_merge_config
from evomerge.merge.methods import TensorParams, merge_tensor
from evomerge.models.architecture import merged_names
from evomerge.models.checkpoint import DTYPES, Checkpoint, parse_dtype
from evomerge.models.compat import check_compatible
from evomerge.models.reference import resolve_model_dir
from evomerge.models.writer import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    copy_tokenizer,
    staged_directory,
    write_config,
)

log = logging.getLogger(__name__)


@dataclass
class MergeSummary:
    out_dir: Path
    method: str
    tensors: int
    bytes: int
    dtype: str


def merge_from_config(
    config_path: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    force: bool = False,
    allow_pickle: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress=None,
    base_dir: Path | None = None,
    extra_files: dict[str, bytes] | None = None,
    keep: tuple[Path, ...] = (),
) -> MergeSummary:
    """`base_dir`: where relative model paths resolve (default: the config's folder); `extra_files`: more
    files written into the model directory (export's model card); `keep`: paths --force never replaces."""
    from evomerge.models.writer import check_destination

    check_destination(out_dir, force, keep)  # before any model is opened
    config = load_merge_config(config_path)
    out = _Out(config_path, base_dir or config_path.parent.resolve(), extra_files or {}, keep)
    if config.slices is not None:
        return _merge_slices(config, out, out_dir, device, force, allow_pickle, shard_bytes, progress)
    plan = ConfigPlan(config)
    base_dir = out.base_dir
    allow_pickle = allow_pickle or config.allow_pickle
    ckpts = {ref: Checkpoint.open(ref, allow_pickle=allow_pickle, base_dir=base_dir) for ref in plan.all_refs}
    _distinct(ckpts)
    for k, entry in enumerate(config.models or []):  # mergekit-evolve writes each model's whole range
        whole = (0, ckpts[entry.model].num_layers)
        if entry.layer_range is not None and tuple(entry.layer_range) != whole:
            raise UserError(
                f"models[{k}].layer_range {list(entry.layer_range)}: only the whole model {list(whole)} is taken "
                "under models:; use slices: for part of a model"
            )
    family = check_compatible(list(ckpts.values()))
    first = ckpts[plan.base] if plan.base else ckpts[plan.inputs[0]]
    load_dtype = parse_dtype(config.dtype)
    out_dtype = parse_dtype(config.out_dtype) or load_dtype or _stored_dtype(first)
    tokenizer_dir = _tokenizer_dir(config.tokenizer_source, first.path, ckpts, base_dir)

    # Resolve and validate every tensor's parameters before any work, so bad values write nothing.
    names = merged_names(list(first.tensors), family, tied := first.ties_embeddings(family))
    params: dict[str, TensorParams] = {
        name: plan.tensor_params(name, family, first.num_layers) for name in names
    }

    spec = plan.method.spec
    grams, texts = None, None
    if spec.calibrated:  # the models' activation statistics, from the config's texts (before any writing)
        from types import SimpleNamespace

        from evomerge.merge.calibration import model_grams, read_texts
        from evomerge.models.loading import load_tokenizer

        if config.calibration is None:
            raise UserError(
                f"{config_path}: {plan.method.value} merges from activation statistics: add calibration: "
                '{texts: FILE} (one JSON object with a "text" string per line)'
            )
        texts = base_dir / config.calibration.texts
        tokenizer = load_tokenizer(SimpleNamespace(path=tokenizer_dir))
        grams = model_grams(
            [ckpts[r] for r in plan.inputs], tokenizer, read_texts(texts), set(names), device, load_dtype
        )

    with staged_directory(out_dir, force, keep) as stage:
        writer = ShardWriter(stage, shard_bytes)
        task = progress.add_task("merging", total=len(names)) if progress else None
        for name in names:
            base = ckpts[plan.base].get(name, dtype=load_dtype, device=device) if plan.base else None
            inputs = [ckpts[ref].get(name, dtype=load_dtype, device=device) for ref in plan.inputs]
            if grams is not None:
                merged = spec.exact_calibrated(name, base, inputs, params[name], grams.get(name))
            else:
                merged = merge_tensor(plan.method, name, base, inputs, params[name])
            writer.add(name, merged.to(out_dtype))
            if progress:
                progress.advance(task)
        writer.finish()
        write_config(stage, first.config, out_dtype, tied)
        copy_tokenizer(tokenizer_dir, stage)
        out.write(stage)
        if texts is not None and Path(config.calibration.texts).name == config.calibration.texts:
            atomic_write(stage / config.calibration.texts, texts.read_bytes())  # the copied config still runs
    return MergeSummary(
        out_dir, plan.method.value, len(names), writer.total_bytes, str(out_dtype).removeprefix("torch.")
    )


@dataclass(frozen=True)
class _Out:
    """Where a config's models resolve and what goes into the merged model's directory besides weights."""

    config_path: Path
    base_dir: Path
    extra: dict[str, bytes]
    keep: tuple[Path, ...]

    def write(self, stage: Path) -> None:
        atomic_write(stage / "mergekit_config.yml", self.config_path.read_bytes())
        for name, data in self.extra.items():
            atomic_write(stage / name, data)


def _merge_slices(config, out: _Out, out_dir: Path, device, force, allow_pickle, shard_bytes, progress):
    """A frankenmerge: the output's layers are the slices' layers, each merged by the config's method."""
    from evomerge.merge.slices import SlicePlan, sliced_config

    config_path = out.config_path
    plan = SlicePlan(config)
    if plan.method.spec.calibrated:
        raise UserError(f"{config_path}: {plan.method.value} with slices is not supported")
    base_dir = out.base_dir
    allow_pickle = allow_pickle or config.allow_pickle
    ckpts = {ref: Checkpoint.open(ref, allow_pickle=allow_pickle, base_dir=base_dir) for ref in plan.all_refs}
    family = check_compatible(list(ckpts.values()), same_depth=False)
    first = ckpts[plan.all_refs[0]]
    tied = first.ties_embeddings(family)
    tensors = {ref: merged_names(list(c.tensors), family, tied) for ref, c in ckpts.items()}
    for ref, ckpt in ckpts.items():
        for k, piece in enumerate(config.slices):
            for source in piece.sources:
                if source.model == ref and source.layer_range[1] > ckpt.num_layers:
                    raise UserError(f"slices[{k}]: {ref} has {ckpt.num_layers} layers, layer_range "
                                    f"{list(source.layer_range)} goes past them")  # fmt: skip
    load_dtype = parse_dtype(config.dtype)
    out_dtype = parse_dtype(config.out_dtype) or load_dtype or _stored_dtype(first)
    tokenizer_dir = _tokenizer_dir(config.tokenizer_source, first.path, ckpts, base_dir)
    jobs = plan.jobs(tensors, family)  # every parameter resolved and checked before anything is written
    method = plan.method
    with staged_directory(out_dir, force, out.keep) as stage:
        writer = ShardWriter(stage, shard_bytes)
        task = progress.add_task("merging", total=len(jobs)) if progress else None
        for job in jobs:
            base = ckpts[job.base[0]].get(job.base[1], dtype=load_dtype, device=device) if job.base else None
            inputs = [ckpts[ref].get(name, dtype=load_dtype, device=device) for ref, name in job.inputs]
            writer.add(job.out, method.spec.exact(job.out, base, inputs, job.params).to(out_dtype))
            if progress:
                progress.advance(task)
        writer.finish()
        configs = {ref: c.config for ref, c in ckpts.items()}
        layers = plan.layer_sources()
        write_config(stage, sliced_config(first.config, len(layers), layers, configs), out_dtype, tied)
        copy_tokenizer(tokenizer_dir, stage)
        out.write(stage)
    return MergeSummary(
        out_dir, method.value, len(jobs), writer.total_bytes, str(out_dtype).removeprefix("torch.")
    )


def _distinct(ckpts: dict[str, Checkpoint]) -> None:
    """Two spellings of one directory (`zoo/a`, `./zoo/a/`) are one model, not two inputs of the merge."""
    seen: dict[Path, str] = {}
    for ref, ckpt in ckpts.items():
        path = ckpt.path.resolve()
        if path in seen:
            raise UserError(f"models {seen[path]} and {ref} are the same model ({path}); list it once")
        seen[path] = ref


def _stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    name = ckpt.config.get("dtype") or ckpt.config.get("torch_dtype")
    return DTYPES.get(name, torch.float32)


def _tokenizer_dir(source: str | None, default: Path, ckpts: dict[str, Checkpoint], base_dir: Path) -> Path:
    """Where the tokenizer comes from; `default` is the base model's dir (the first input's without one)."""
    if source in (None, "base"):
        return default
    if source == "union":
        files = [c.path / "tokenizer.json" for c in ckpts.values()]
        if all(f.is_file() for f in files) and all(
            filecmp.cmp(files[0], f, shallow=False) for f in files[1:]
        ):
            return default
        raise UserError(
            "tokenizer_source: union of different tokenizers is not supported; name one model's tokenizer"
        )
    if source in ckpts:
        return ckpts[source].path
    return resolve_model_dir(source, base_dir=base_dir)
