"""How evomerge touches the file system: the only module that writes files into directories it did not
create, marks what it made, deletes, and locks.

- Writes go through a fresh unique temporary file (O_EXCL, never following a symlink) in the same
  directory, then `os.replace`: a planted symlink at the destination name is replaced, never followed, and
  readers see the old file or the new one, never half of one. Files and directories get the permissions
  the user's umask gives (mkstemp's 0600 / mkdtemp's 0700 are widened to 0o666 / 0o777 & ~umask).
- Every directory evomerge creates as a unit (an experiment, a staged experiment, a model it writes) holds
  a marker file `.evomerge` naming its kind. `--force` deletes a directory only when it carries the marker
  of the expected kind, and never `.`, the working directory or one of its ancestors, nor a directory
  the caller says must survive (the experiment being exported).
- One writer per experiment: `DirectoryLock` holds an exclusive `flock` on a lock file in the directory for
  the whole run; a second writer fails at once with the holder's pid and host.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Any

from evomerge.errors import UserError

MARKER = ".evomerge"
LOCK = ".evomerge.lock"
EXPERIMENT, STAGED, MODEL = "experiment", "staged-experiment", "model"
_KINDS = (EXPERIMENT, STAGED, MODEL)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a unique temp file + rename (see the module docstring)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{path} is a directory; evomerge writes a file there: move it aside")
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def open_append(path: str | Path):
    """A text stream appending to `path`, refusing to follow a symlink there (logs in an experiment dir)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; evomerge does not write through links") from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def temp_dir_beside(path: Path) -> Path:
    """A new empty directory next to `path` (same file system, so it can be renamed onto it)."""
    path.parent.mkdir(parents=True, exist_ok=True)  # the umask's permissions
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(stage, dir_mode())
    return stage


# -- markers -----------------------------------------------------------------------------------------------


def mark(directory: Path, kind: str, **extra: Any) -> None:
    """Say that evomerge made `directory` as a `kind` (only then may --force delete it)."""
    if kind not in _KINDS:
        raise ValueError(kind)
    atomic_write(directory / MARKER, json.dumps({"kind": kind, **extra}, sort_keys=True) + "\n")


def marker(directory: Path) -> dict[str, Any] | None:
    """The marker's content, or None when there is none (or it is not one of ours)."""
    file = directory / MARKER
    if file.is_symlink() or not file.is_file():
        return None
    try:
        data = json.loads(file.read_text()[:10_000])
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") in _KINDS else None


def marked_as(directory: Path, kind: str) -> bool:
    found = marker(directory)
    return found is not None and found["kind"] == kind


# -- deletion ----------------------------------------------------------------------------------------------


def covers(path: Path, other: Path) -> bool:
    """Whether removing `path` removes `other`: it is `other` or one of its ancestors."""
    path, other = path.resolve(), other.resolve()
    return path == other or path in other.parents


def check_protected(path: Path, *, keep: tuple[Path, ...] = (), what: str = "--force") -> None:
    """Raise UserError when deleting or replacing `path` would harm what must survive: `.`/`..`, a symbolic
    link's target, the working directory or an ancestor of it, anything in `keep` or an ancestor of it."""
    if path.name in ("", ".", ".."):
        raise UserError(f"{what}: refusing to delete {str(path)!r} (name it explicitly)")
    if path.is_symlink():
        raise UserError(f"{what}: {path} is a symbolic link; refusing to delete through it")
    if covers(path, Path.cwd()):
        raise UserError(f"{what}: {path} is the working directory or contains it; refusing to delete it")
    for kept in keep:
        if covers(path, kept):
            raise UserError(f"{what}: deleting {path} would delete {kept.resolve()}; refusing")


def check_deletable(path: Path, kind: str, *, keep: tuple[Path, ...] = ()) -> None:
    """Raise UserError unless `path` is a directory evomerge made as `kind` and deleting it harms nothing
    that must survive (`check_protected`)."""
    what = "--force"
    check_protected(path, keep=keep, what=what)
    if not path.is_dir():
        raise UserError(f"{what}: {path} is not a directory; refusing to delete it")
    if not marked_as(path, kind):
        raise UserError(
            f"{what}: {path} was not created by evomerge as {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
            f"(no {MARKER} marker of that kind); refusing to delete it: remove it yourself or choose another path"
        )


def remove_marked(path: Path, kind: str, *, keep: tuple[Path, ...] = (), spare: tuple[str, ...] = ()) -> None:
    """Delete the marked directory `path` (checked as `check_deletable`); names in `spare` (e.g. a held lock
    file) are left in place with the directory itself."""
    check_deletable(path, kind, keep=keep)
    if not spare:
        shutil.rmtree(path)
        return
    for child in path.iterdir():
        if child.name in spare:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def replace_dir(stage: Path, out_dir: Path, kind: str, *, keep: tuple[Path, ...] = ()) -> None:
    """Put the finished directory `stage` at `out_dir`, replacing a marked `kind` there (checked first)."""
    if out_dir.exists() or out_dir.is_symlink():
        check_deletable(out_dir, kind, keep=keep)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rename(out_dir, old / "x")
        os.rename(stage, out_dir)
        shutil.rmtree(old)
        return
    os.rename(stage, out_dir)


# -- one writer --------------------------------------------------------------------------------------------


class DirectoryLock:
    """An exclusive lock on `directory` for one writer (flock on `<directory>/.evomerge.lock`); released
    when closed or when the process dies, however it dies."""

    def __init__(self, directory: Path, what: str = "experiment") -> None:
        import fcntl

        self.path = directory / LOCK
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{self.path} is a symbolic link; refusing to use it as a lock") from None
            raise UserError(f"cannot create the lock file {self.path} ({exc.strerror})") from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise UserError(f"{self.path} is not a regular file; refusing to use it as a lock")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            for _ in range(40):  # the holder writes its pid just after it takes the lock: give it a moment
                holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
                if holder:
                    break
                time.sleep(0.025)
            os.close(self.fd)
            raise UserError(
                f"{directory}: the {what} is in use by another evomerge search"
                f" ({one_line(holder) or 'pid unknown'}); wait for it or stop it first"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- names shown to people ---------------------------------------------------------------------------------


def one_line(text: Any) -> str:
    """`text` with newlines and other control or separator characters replaced by spaces: a name from a
    config or a model directory stays on its line in markdown, HTML, CSV and terminals."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch != "\u200d":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)
