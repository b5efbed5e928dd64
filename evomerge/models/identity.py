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


def tokenizer_fingerprint(path: Path) -> str:
    """A hash of the tokenizer files (names and contents): the same weights read with another vocabulary
    are another model (two swapped token ids change the scores)."""
    from evomerge.models.writer import TOKENIZER_FILES

    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
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
    record: dict[str, Any] = {
        "ref": ckpt.ref,
        "fingerprint": fingerprint(ckpt),
        "tokenizer": tokenizer_fingerprint(ckpt.path),
    }
    if revision is not None:
        record["hub"] = {"id": ckpt.ref, "revision": revision}
    else:
        record["path"] = str(ckpt.path.resolve())
    return record


def describe_models(base: Checkpoint | None, sources: list[Checkpoint]) -> dict[str, Any]:
    return {"base": describe(base) if base is not None else None, "sources": [describe(s) for s in sources]}


def check_same_models(recorded: dict[str, Any], now: dict[str, Any], where: Path) -> list[str]:
    """UserError naming the first model whose weights or tokenizer differ from the recorded ones; else the
    notes to show (models whose tokenizer an older evomerge did not record)."""
    pairs = [("models.base", recorded.get("base"), now.get("base"))]
    recorded_sources = recorded.get("sources", [])
    if not isinstance(recorded_sources, list):
        raise UserError(f"{where}: the journal's record of models.sources is damaged")
    pairs += [
        (f"models.sources[{i}]", old, new)
        for i, (old, new) in enumerate(zip(recorded_sources, now.get("sources", []), strict=False))
    ]
    notes = []
    for role, old, new in pairs:
        if old is None or new is None:
            continue
        if not isinstance(old, dict) or not isinstance(old.get("fingerprint"), str):
            raise UserError(f"{where}: the journal's record of {role} is damaged")
        if old["fingerprint"] != new["fingerprint"]:
            what = "its config or weight files differ"
        elif "tokenizer" not in old:
            notes.append(
                f"model {new['ref']} ({role}): its tokenizer was not recorded when this experiment started "
                "(an older evomerge); it is recorded from now on"
            )
            continue
        elif old["tokenizer"] != new.get("tokenizer"):
            what = "its tokenizer files differ"
        else:
            continue
        raise UserError(
            f"{where}: model {new['ref']} ({role}) is not the one this experiment started with ({_where(old)}; "
            f"{what}); resume with that model, or start over with --fresh --force or another --out"
        )
    return notes


def _where(record: dict[str, Any]) -> str:
    if "hub" in record:
        return f"{record['hub']['id']} at commit {record['hub']['revision'][:12]}"
    return record.get("path", record["ref"])


def open_recorded(config, config_dir: Path | None, recorded: dict[str, Any] | None, where: Path):
    """(base, sources, family) of an experiment as it was searched: each model from the location the
    experiment recorded (the resolved path, or the hub id at its commit), whatever the working directory
    is now, and refused (one line) when its weights or tokenizer are no longer the ones it recorded. For
    experiments older than the record, the config's references as the search resolves them."""
    from evomerge.models.compat import check_compatible
    from evomerge.models.loading import open_models

    if not recorded:
        return open_models(config, config_dir)

    def open_one(ref: str, record: Any) -> Checkpoint:
        location: str | Path = ref
        revision = None
        if isinstance(record, dict) and isinstance(record.get("path"), str) and Path(record["path"]).is_dir():
            location = Path(record["path"])
        elif isinstance(record, dict) and isinstance(record.get("hub"), dict):
            revision = record["hub"].get("revision")
        if revision is not None:
            from evomerge.models.reference import resolve_model_dir

            ckpt = Checkpoint.open(resolve_model_dir(ref, revision=str(revision)))
        else:
            ckpt = Checkpoint.open(location, base_dir=config_dir)
        ckpt.ref = ref
        return ckpt

    records = recorded.get("sources") if isinstance(recorded.get("sources"), list) else []
    base = open_one(config.models.base, recorded.get("base")) if config.models.base else None
    sources = [
        open_one(ref, records[i] if i < len(records) else None) for i, ref in enumerate(config.models.sources)
    ]
    check_same_models(recorded, describe_models(base, sources), where)
    family = check_compatible(([base] if base else []) + sources)
    return base, sources, family
