"""Write a Hugging Face model directory: config, safetensors shards (+ index), tokenizer files.

Everything goes into a fresh temporary sibling directory that is renamed into place at the end, so a
failure leaves nothing at the destination; the directory is marked as an evomerge model, which is what
lets a later `--force` replace it (and nothing else).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge.errors import UserError, non_finite_message
from evomerge.files import (
    MODEL,
    atomic_write,
    check_deletable,
    check_protected,
    covers,
    file_mode,
    mark,
    replace_dir,
    temp_dir_beside,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
DEFAULT_SHARD_BYTES = 5 * 1024**3


def check_destination(out_dir: Path, force: bool, keep: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, a destination that is not free: with `force`, only a directory evomerge
    wrote as a model may be replaced (never `.`, the working directory, or anything in `keep`)."""
    if out_dir.is_symlink():
        raise UserError(f"output {out_dir} is a symbolic link; write to a real path")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a directory")
    for kept in keep:
        if covers(out_dir, kept):
            raise UserError(f"output {out_dir} would replace {kept}; choose another directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise UserError(f"output directory {out_dir} is not empty (use --force to replace it)")
        check_deletable(out_dir, MODEL, keep=keep)
    elif out_dir.is_dir():  # an empty directory is replaced too: still never `.` or the working directory
        check_protected(out_dir, what="output")


@contextmanager
def staged_directory(out_dir: Path, force: bool = False, keep: tuple[Path, ...] = ()):
    """Yield a fresh temporary directory; on success it is marked and replaces `out_dir`, on failure it is
    removed."""
    check_destination(out_dir, force, keep)
    stage = temp_dir_beside(out_dir)
    try:
        yield stage
        mark(stage, MODEL)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        replace_dir(stage, out_dir, MODEL, keep=keep)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


class ShardWriter:
    """Accumulates tensors and writes shards of at most `max_bytes` (a lone larger tensor gets its own)."""

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._storages: set[int] = set()  # storages of the pending tensors (safetensors refuses sharing)
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue `name`; a tensor holding NaN or inf is refused (the staged output is then removed whole)."""
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(non_finite_message(name, str(tensor.dtype)) + "; nothing was written")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in self._storages:  # the same stored tensor under a second name (a repeated DFS layer)
            tensor = tensor.clone()
            storage = tensor.untyped_storage().data_ptr()
        self._storages.add(storage)
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        os.chmod(path, file_mode())  # safetensors creates its files 0600; outputs follow the umask
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes, self._storages = {}, 0, set()

    def finish(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.directory / "model.safetensors")
            return
        count = len(self._shards)
        weight_map = {}
        for i, (path, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        atomic_write(self.directory / "model.safetensors.index.json", json.dumps(index, indent=2))


def write_config(
    directory: Path, config: dict[str, Any], dtype: torch.dtype, tied: bool | None = None
) -> None:
    """`tied`: whether the written weights are meant tied (lm_head = embeddings); when a config asks for
    tying but the weights are kept apart, it says so, so every loader builds the same model."""
    config = dict(config)
    if tied is not None and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = tied
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    atomic_write(directory / "config.json", json.dumps(config, indent=2, sort_keys=True))


log = logging.getLogger(__name__)


def copy_tokenizer(source: Path, directory: Path) -> list[str]:
    """The tokenizer files of the model dir `source`, content only, with fresh modes. Only regular files
    inside the model dir are copied (or, for a Hugging Face cache snapshot, its links into the repo's blob
    store): a link to anywhere else is skipped, so a private file linked as `merges.txt` never lands in
    an output others can read."""
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        file = source / name
        if not file.is_file():
            continue
        if not _inside_model(file, source):
            log.warning("%s is a link out of the model directory; not copied", file)
            continue
        atomic_write(directory / name, file.read_bytes())
        copied.append(name)
    return copied


def _inside_model(file: Path, model_dir: Path) -> bool:
    real, home = file.resolve(), model_dir.resolve()
    if not real.is_file():
        return False
    allowed = [home]
    if home.parent.name == "snapshots" and home.parent.parent.name.startswith("models--"):
        allowed.append(
            home.parent.parent / "blobs"
        )  # the HF cache: snapshots/<commit>/x -> ../../blobs/<hash>
    return any(real.is_relative_to(root) for root in allowed)
