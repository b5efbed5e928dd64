"""Which weights an experiment was started with: per model, where it was found (a local directory, or a hub
id and the commit its cache snapshot holds) and a fingerprint of what it holds: config.json, and per
weight file its name, size, safetensors header and 16 samples of 64 KiB spread over its data. Fine-tunes
of one base have identical headers (same names, shapes, offsets), but they differ in nearly every
weight, so the samples tell them apart; a fingerprint reads about 1 MiB per file, not the weights. (It
would miss a single edited tensor between the samples: it guards against the wrong model, not tampering.)

Resuming with a model whose fingerprint changed is refused: the journal's scores would mix two models.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

from evomerge.errors import UserError
from evomerge.models.checkpoint import Checkpoint

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header
_SAMPLES, _SAMPLE_BYTES = 16, 64 * 1024


def fingerprint(ckpt: Checkpoint) -> str:
    digest = hashlib.sha256()
    config = ckpt.path / "config.json"
    digest.update(b"config.json\0" + config.read_bytes() + b"\0")
    for file in sorted({info.file for info in ckpt.tensors.values()}, key=lambda f: f.name):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        start = 0
        if file.suffix == ".safetensors":
            header = _safetensors_header(file)
            digest.update(header)
            start = 8 + len(header)
        with file.open("rb") as handle:  # the data region, sampled (a pickled .bin: the whole file)
            span = max(0, size - start - _SAMPLE_BYTES)
            for i in range(_SAMPLES):
                handle.seek(start + span * i // (_SAMPLES - 1))
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _safetensors_header(file: Path) -> bytes:
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise UserError(f"{file}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise UserError(f"{file}: safetensors header of {length} bytes; the file is damaged")
        return handle.read(length)


def hub_revision(path: Path) -> str | None:
    """The commit a Hugging Face cache snapshot directory holds (…/models--org--name/snapshots/<commit>)."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """What the experiment records of one model."""
    revision = hub_revision(ckpt.path)
    record: dict[str, Any] = {"ref": ckpt.ref, "fingerprint": fingerprint(ckpt)}
    if revision is not None:
        record["hub"] = {"id": ckpt.ref, "revision": revision}
    else:
        record["path"] = str(ckpt.path.resolve())
    return record


def describe_models(base: Checkpoint | None, sources: list[Checkpoint]) -> dict[str, Any]:
    return {"base": describe(base) if base is not None else None, "sources": [describe(s) for s in sources]}


def check_same_models(recorded: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    """UserError naming the first model whose weights differ from the recorded ones."""
    pairs = [("models.base", recorded.get("base"), now.get("base"))]
    pairs += [
        (f"models.sources[{i}]", old, new)
        for i, (old, new) in enumerate(zip(recorded.get("sources", []), now.get("sources", []), strict=False))
    ]
    for role, old, new in pairs:
        if old is None or new is None or old["fingerprint"] == new["fingerprint"]:
            continue
        was = _where(old)
        raise UserError(
            f"{where}: model {new['ref']} ({role}) is not the one this experiment started with ({was}; its "
            "config or weight files differ); resume with those weights, or start over with --fresh --force "
            "or another --out"
        )


def _where(record: dict[str, Any]) -> str:
    if "hub" in record:
        return f"{record['hub']['id']} at commit {record['hub']['revision'][:12]}"
    return record.get("path", record["ref"])
