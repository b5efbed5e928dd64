"""Turn a model reference (local directory or hub id) into a local directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

from evomerge.errors import UserError, first_line

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def resolve_model_dir(
    ref: str | os.PathLike[str], *, base_dir: Path | None = None, revision: str | None = None
) -> Path:
    """Local directory for `ref`: an existing directory (relative to the CWD, then to `base_dir`),
    else a hub id resolved through huggingface_hub's cache (downloading only when the hub is reachable)."""
    text = str(ref)
    candidates = [Path(text).expanduser()]
    if base_dir is not None and not Path(text).is_absolute():
        candidates.append(base_dir / text)
    for path in candidates:
        if path.is_dir():
            return path.resolve()
        if path.exists():
            raise UserError(f"model {text}: {path} is a file, expected a model directory")
    if not looks_like_hub_id(text):
        raise UserError(f"model directory not found: {text}")
    return _from_hub(text, revision)


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The hub id's snapshot in the local Hugging Face cache, without any network access; None if absent."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True)
        )
    except Exception:
        return None


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    cached = cached_snapshot(repo_id, revision)
    if cached is not None:  # else try the hub itself unless told to stay offline
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(
            f"model {repo_id}: not a local directory, not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise UserError(
            f"model {repo_id}: not a local directory, and the hub id could not be resolved ({first_line(exc)})"
        ) from None
