"""The experiment directory: one SQLite database (WAL) that is the source of truth for a run.

    <dir>/experiment.sqlite   config snapshot + hash, every evaluation, optimizer checkpoint, finals
    <dir>/config.yaml         a copy of the config, for people (never read back)
    <dir>/search.log          the run's log

Each finished evaluation is one transaction; the optimizer's state after each tell replaces the previous
one in one transaction. A process killed at any moment leaves the database at the last commit. Only this
module knows the layout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import UserError

DB_NAME = "experiment.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    genome TEXT NOT NULL,
    recipe TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    reason TEXT,
    fitness REAL NOT NULL,
    metrics TEXT NOT NULL,
    merge_seconds REAL NOT NULL,
    eval_seconds REAL NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    UNIQUE (generation, idx)
);
CREATE TABLE optimizer (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL,
    state BLOB NOT NULL,
    saved_at REAL NOT NULL
);
CREATE TABLE finals (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('evolved', 'parent', 'default')),
    candidate_id INTEGER,
    recipe TEXT,
    split TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    fitness REAL NOT NULL,
    metrics TEXT NOT NULL,
    seconds REAL NOT NULL,
    finished_at REAL NOT NULL
);
"""


@dataclass
class Candidate:
    id: int | None
    generation: int
    idx: int
    genome: list[float]
    recipe: dict[str, Any]
    status: str
    reason: str | None
    fitness: float
    metrics: dict[str, Any]
    merge_seconds: float
    eval_seconds: float
    started_at: float
    finished_at: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Final:
    name: str
    kind: str
    candidate_id: int | None
    recipe: dict[str, Any] | None
    split: str
    status: str
    reason: str | None
    fitness: float
    metrics: dict[str, Any]
    seconds: float
    finished_at: float


class ExperimentStore:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.dir = path
        if readonly:  # readers (reports) never write, so a running search is never blocked or altered
            uri = f"{(path / DB_NAME).resolve().as_uri()}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
        else:
            self.db = sqlite3.connect(path / DB_NAME, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        version = self.meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise UserError(
                f"{path}: experiment schema version {version}, this evomerge reads {SCHEMA_VERSION}"
            )

    # -- opening -------------------------------------------------------------------------------------

    @staticmethod
    def exists(path: Path) -> bool:
        return (path / DB_NAME).is_file()

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> ExperimentStore:
        path = Path(path)
        if not cls.exists(path):
            raise UserError(f"no experiment at {path} (expected {path / DB_NAME})")
        try:
            return cls(path, readonly)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{path / DB_NAME}: not a readable experiment database ({exc})") from None

    @classmethod
    def create(
        cls, path: str | Path, meta: dict[str, str], *, config_text: str, replace: bool = False
    ) -> ExperimentStore:
        """A new experiment; the database appears complete or not at all (built aside, then renamed)."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if not replace:
                raise UserError(f"{path} exists and is not empty")
            if not cls.exists(path):
                raise UserError(f"{path} is not an experiment directory; refusing to delete it")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        partial = path / f".{DB_NAME}.partial"
        partial.unlink(missing_ok=True)
        db = sqlite3.connect(partial)
        with db:
            db.executescript(_SCHEMA)
            rows = {"schema_version": str(SCHEMA_VERSION), "created_at": str(time.time()), **meta}
            db.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
        db.close()
        _fsync(partial)
        os.replace(partial, path / DB_NAME)
        (path / "config.yaml").write_text(config_text)
        return cls(path)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ----------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- candidates ----------------------------------------------------------------------------------

    def record(self, c: Candidate) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO candidates (generation, idx, genome, recipe, status, reason, fitness, metrics, "
                "merge_seconds, eval_seconds, started_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    c.generation, c.idx, json.dumps(c.genome), json.dumps(c.recipe), c.status, c.reason,
                    c.fitness, json.dumps(c.metrics), c.merge_seconds, c.eval_seconds, c.started_at,
                    c.finished_at,
                ),
            )  # fmt: skip
            return int(cur.lastrowid)

    def candidates(self, generation: int | None = None) -> list[Candidate]:
        sql = "SELECT * FROM candidates" + (" WHERE generation = ?" if generation is not None else "")
        rows = self.db.execute(sql + " ORDER BY id", () if generation is None else (generation,)).fetchall()
        return [_candidate(row) for row in rows]

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0])

    def best(self) -> Candidate | None:
        row = self.db.execute(
            "SELECT * FROM candidates WHERE status = 'ok' ORDER BY fitness DESC, id ASC LIMIT 1"
        ).fetchone()
        return _candidate(row) if row else None

    # -- optimizer -----------------------------------------------------------------------------------

    def save_optimizer(self, generation: int, state: bytes) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO optimizer VALUES (1, ?, ?, ?)", (generation, state, time.time())
            )

    def optimizer(self) -> tuple[int, bytes] | None:
        row = self.db.execute("SELECT generation, state FROM optimizer WHERE id = 1").fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    # -- finals --------------------------------------------------------------------------------------

    def record_final(self, f: Final) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO finals VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    f.name, f.kind, f.candidate_id, json.dumps(f.recipe) if f.recipe is not None else None,
                    f.split, f.status, f.reason, f.fitness, json.dumps(f.metrics), f.seconds, f.finished_at,
                ),
            )  # fmt: skip

    def finals(self) -> list[Final]:
        rows = self.db.execute("SELECT * FROM finals ORDER BY fitness DESC, name").fetchall()
        return [
            Final(
                r[0],
                r[1],
                r[2],
                json.loads(r[3]) if r[3] else None,
                r[4],
                r[5],
                r[6],
                r[7],
                json.loads(r[8]),
                r[9],
                r[10],
            )
            for r in rows
        ]

    def clear_finals(self, kind: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM finals WHERE kind = ?", (kind,))


def experiment_dirs(paths: list[Path]) -> list[Path]:
    """The experiments behind `paths`: a staged experiment's directory stands for its stages (each an
    experiment directory inside it), in the order they were created."""
    out = []
    for path in paths:
        stages = []
        if path.is_dir() and not ExperimentStore.exists(path):
            stages = sorted(
                (p for p in path.iterdir() if ExperimentStore.exists(p)), key=lambda p: p.stat().st_ctime
            )
        out += stages or [path]
    return out


def _candidate(row) -> Candidate:
    fitness = row[7] if row[7] is not None else -math.inf
    return Candidate(
        row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5], row[6], fitness,
        json.loads(row[8]), row[9], row[10], row[11], row[12],
    )  # fmt: skip


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
