"""The experiment directory: one SQLite database (WAL) that is the source of truth for a run.

    <dir>/experiment.sqlite   config snapshot + hash, every evaluation, finals
    <dir>/config.yaml         a copy of the config, for people (never read back)
    <dir>/search.log          the run's log
    <dir>/.evomerge           marker: evomerge made this directory (what --force may delete)
    <dir>/.evomerge.lock      held by the one process writing the experiment

Each candidate and score row carries a checksum of what it means (genome, recipe, status, fitness,
metrics...): a row edited by hand, or damaged, is refused with one line instead of being resumed or
exported (from the first row written with checksums on, every later row must have one). Any other damage
(not a database, a malformed page, unreadable JSON) is one line too, never a traceback.

Each finished evaluation is one transaction; a process killed at any moment leaves the database at the
last commit. Everything in it is data (JSON, numbers, text): nothing read from an experiment is unpickled
or executed. The optimizer's state is not stored at all: it is a function of the config and the journaled
results, rebuilt by replaying them (search/run.py). Only this module knows the layout.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge import files
from evomerge.errors import UserError, first_line
from evomerge.files import EXPERIMENT, STAGED, atomic_write, mark, marker

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
    fidelity TEXT,  -- JSON {"items": item-evaluations, "full": scored on every search item, ...}; NULL: full
    checksum TEXT,  -- of what the row means (see _checksum); NULL in rows written before checksums
    UNIQUE (generation, idx)
);
CREATE TABLE optimizer (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL,
    state BLOB NOT NULL,
    saved_at REAL NOT NULL
);  -- kept for schema version 1; no longer written or read (evomerge never unpickles an experiment)
CREATE TABLE IF NOT EXISTS items (
    owner TEXT NOT NULL,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    ids BLOB NOT NULL,
    vals BLOB NOT NULL,
    PRIMARY KEY (owner, task)
);
CREATE TABLE IF NOT EXISTS scores (
    owner TEXT PRIMARY KEY,  -- rescore:<generation>.<idx> | prior:<name> | rung:<generation>.<idx>.<rung>
    status TEXT NOT NULL,
    reason TEXT,
    fitness REAL NOT NULL,
    metrics TEXT NOT NULL,
    item_evals INTEGER NOT NULL,
    seconds REAL NOT NULL,
    finished_at REAL NOT NULL,
    checksum TEXT
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


_ADDED = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS items") : _SCHEMA.index("CREATE TABLE finals")]


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
    fidelity: dict[str, Any] | None = None  # None: scored on every search item (full fidelity)
    rescored: float | None = None  # its fitness on every search item, when re-scored after an estimate

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def estimate(self) -> bool:
        """Whether `fitness` comes from part of the search split (an estimate of the full-split fitness)."""
        return self.fidelity is not None and not self.fidelity.get("full", False)

    @property
    def full_fitness(self) -> float | None:
        """Its fitness on every search item, if it has one (scored in full, or re-scored)."""
        if not self.ok:
            return None
        return self.rescored if self.estimate else self.fitness

    @property
    def item_evals(self) -> int | None:
        return None if self.fidelity is None else int(self.fidelity.get("items", 0))


@dataclass
class Score:
    """An evaluation beside the candidates' own: a re-score on the whole search split, a model scored
    before the search (anchor evidence), a racing rung."""

    owner: str
    status: str
    reason: str | None
    fitness: float
    metrics: dict[str, Any]
    item_evals: int
    seconds: float
    finished_at: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def item_evaluations(candidates, scores) -> int:
    """(task, item) pairs a search scored: its candidates (a racer's row sums its rungs) plus the other
    evaluations of the search split (anchor evidence, re-scores). Rows journaled before fidelity modes
    existed count 0."""
    return sum(c.item_evals or 0 for c in candidates) + sum(
        s.item_evals for s in scores if not s.owner.startswith("rung:")
    )


def rank_key(c: Candidate) -> tuple:
    """Best first: candidates with a fitness on every search item (by it), then the estimated rest; ties
    go to the earlier place in the run (not the journal id, whose order depends on which worker finished
    first)."""
    full = c.full_fitness
    return (full is None, -(full if full is not None else c.fitness), c.generation, c.idx)


def rescore_owner(c: Candidate) -> str:
    """A re-score's name in the journal: by the candidate's place in the run, the same on every executor."""
    return f"rescore:{c.generation}.{c.idx}"


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


def _readable(method):
    """Damage met while reading (not a database, a malformed page, a value of the wrong type) is one
    UserError naming the file, never a traceback."""
    import functools

    @functools.wraps(method)
    def read(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.dir / DB_NAME}: the journal is damaged ({first_line(exc)})") from None
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise UserError(
                f"{self.dir / DB_NAME}: the journal is damaged ({type(exc).__name__}: {first_line(exc, 120)})"
            ) from None

    return read


class ExperimentStore:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.dir = path
        if readonly:  # readers (reports) never write, so a running search is never blocked or altered
            uri = f"{(path / DB_NAME).resolve().as_uri()}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
        else:
            if (path / DB_NAME).is_symlink():
                raise UserError(f"{path / DB_NAME} is a symbolic link; evomerge does not write through links")
            self.db = sqlite3.connect(path / DB_NAME, isolation_level=None, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        version = self.meta("schema_version")
        if version != str(SCHEMA_VERSION):
            raise UserError(
                f"{path}: experiment schema version {version}, this evomerge reads {SCHEMA_VERSION}"
            )
        if not readonly:  # experiments made before per-item results and fidelity modes gain them
            self.db.executescript(_ADDED)
            try:
                columns = {row[1] for row in self.db.execute("PRAGMA table_info(candidates)")}
                if "fidelity" not in columns:
                    self.db.execute("ALTER TABLE candidates ADD COLUMN fidelity TEXT")
                for table in ("candidates", "scores"):
                    if "checksum" not in {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN checksum TEXT")
                if self.meta("checksums_from") is None:  # rows after this point must carry checksums
                    first = self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM candidates").fetchone()[0]
                    self.db.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('checksums_from', ?)",
                        (json.dumps({"candidates": first, "at": time.time()}),),
                    )
            except sqlite3.OperationalError as exc:
                raise UserError(f"{path / DB_NAME}: cannot upgrade the journal ({first_line(exc)})") from None

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
    def create(cls, path: str | Path, meta: dict[str, str], *, config_text: str) -> ExperimentStore:
        """A new experiment in `path`, which the caller has created and locked (`DirectoryLock`), holding no
        experiment yet; the database appears complete or not at all (built aside, then renamed)."""
        path = Path(path)
        if cls.exists(path):
            raise UserError(f"{path} already holds an experiment")
        mark(path, EXPERIMENT)
        fd, partial = tempfile.mkstemp(prefix=f".{DB_NAME}.", suffix=".partial", dir=path)
        os.close(fd)
        try:
            db = sqlite3.connect(partial)
            with db:
                db.executescript(_SCHEMA)
                rows = {"schema_version": str(SCHEMA_VERSION), "created_at": str(time.time()), **meta}
                db.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
            db.close()
            os.chmod(partial, files.file_mode())
            _fsync(Path(partial))
            os.replace(partial, path / DB_NAME)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        atomic_write(path / "config.yaml", config_text)
        return cls(path)

    @staticmethod
    def is_fresh_dir(path: Path) -> bool:
        """True when `path` does not exist, is empty, or holds only what evomerge put there before any
        database existed (a run killed while creating it)."""
        if not path.exists():
            return True
        names = {p.name for p in path.iterdir()} - {files.LOCK}  # the lock is the caller's own
        ours = {files.MARKER, "config.yaml", "search.log"}
        marked = (marker(path) or {}).get("kind") == EXPERIMENT
        return not names or (marked and names <= ours | {n for n in names if n.endswith(".partial")})

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed whole, or rolled back whole. A write that the disk refuses (full,
        read-only, I/O error), at any statement or at COMMIT, leaves the database as it was and becomes
        one UserError."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as exc:
            raise UserError(
                f"{self.dir / DB_NAME}: cannot write the journal ({first_line(exc)}); the last finished "
                "evaluation is saved: free space (or fix the file system) and run the same command to resume"
            ) from None

    # -- meta ----------------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return None
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.dir / DB_NAME}: the journal is damaged ({first_line(exc)})") from None
        if row and not isinstance(row[0], str):
            raise UserError(f"{self.dir / DB_NAME}: the journal is damaged (meta {key} is not text)")
        return row[0] if row else None

    def meta_json(self, key: str, default: Any = None) -> Any:
        """A meta value that holds JSON, parsed; one UserError when it does not parse."""
        text = self.meta(key)
        if text is None:
            return default
        try:
            return json.loads(text)
        except ValueError:
            raise UserError(
                f"{self.dir / DB_NAME}: the journal is damaged (meta {key} is not JSON)"
            ) from None

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- candidates ----------------------------------------------------------------------------------

    def record(self, c: Candidate, items: dict[str, dict[str, Any]] | None = None) -> int:
        """Journal one evaluation and its per-item results (`task -> {metric, ids, values}`), atomically."""
        with self._tx() as db:
            meaning = (
                int(c.generation), int(c.idx), json.dumps(c.genome), json.dumps(c.recipe), c.status, c.reason,
                float(c.fitness),
                json.dumps(c.metrics), json.dumps(c.fidelity) if c.fidelity is not None else None,
            )  # fmt: skip
            cur = db.execute(
                "INSERT INTO candidates (generation, idx, genome, recipe, status, reason, fitness, metrics, "
                "merge_seconds, eval_seconds, started_at, finished_at, fidelity, checksum) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (*meaning[:8], c.merge_seconds, c.eval_seconds, c.started_at, c.finished_at, meaning[8],
                 _checksum(meaning)),
            )  # fmt: skip
            _write_items(db, f"candidate:{cur.lastrowid}", items)
            return int(cur.lastrowid)

    @_readable
    def candidates(self, generation: int | None = None) -> list[Candidate]:
        sql = "SELECT * FROM candidates" + (" WHERE generation = ?" if generation is not None else "")
        rows = self.db.execute(sql + " ORDER BY id", () if generation is None else (generation,)).fetchall()
        out = [self._candidate(row) for row in rows]
        rescored = {s.owner: s for s in self.scores("rescore:")}
        for c in out:
            again = rescored.get(rescore_owner(c))
            if again is not None and again.ok:
                c.rescored = again.fitness
        return out

    @_readable
    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0])

    @_readable
    def best(self) -> Candidate | None:
        """The best by the fitness the search saw (an estimate under a cheap fidelity)."""
        row = self.db.execute(
            "SELECT * FROM candidates WHERE status = 'ok' ORDER BY fitness DESC, generation, idx LIMIT 1"
        ).fetchone()
        return self._candidate(row) if row else None

    @_readable
    def winner(self) -> Candidate | None:
        """The candidate the finals score: the best fitness on every search item among those that have
        one (all of them at full fidelity; the re-scored otherwise), else the best estimate."""
        ranked = sorted((c for c in self.candidates() if c.ok), key=rank_key)
        return ranked[0] if ranked else None

    def _checksums(self) -> dict[str, Any]:
        """From where rows must carry checksums ({"candidates": first id, "at": time}); a journal never
        opened for writing since checksums exist has none to require."""
        if not hasattr(self, "_checksums_from"):
            try:
                data = json.loads(self.meta("checksums_from") or "null")
            except ValueError:
                data = None
            if not (isinstance(data, dict) and isinstance(data.get("candidates"), int)
                    and isinstance(data.get("at"), int | float)):  # fmt: skip
                data = {"candidates": math.inf, "at": math.inf}
            self._checksums_from = data
        return self._checksums_from

    def _verify(self, what: str, key: Any, meaning: tuple, stored: str | None, required: bool) -> None:
        if stored is None and not required:
            return  # written before checksums existed
        if stored != _checksum(tuple(meaning)):
            raise UserError(
                f"{self.dir / DB_NAME}: journal {what} {key} was changed after it was written (its checksum "
                "does not match); evomerge does not resume or export an edited journal: restore the file, or "
                "start over with --fresh --force"
            )

    def _candidate(self, row) -> Candidate:
        stored = row[14] if len(row) > 14 else None
        self._verify("row", row[0], (*row[1:9], row[13] if len(row) > 13 else None), stored,
                     row[0] >= self._checksums()["candidates"])  # fmt: skip
        try:
            fitness = float(row[7]) if row[7] is not None else -math.inf
            genome = [float(x) for x in json.loads(row[3])]
            recipe, metrics = json.loads(row[4]), json.loads(row[8])
            fidelity = json.loads(row[13]) if len(row) > 13 and row[13] is not None else None
            if not isinstance(recipe, dict) or not isinstance(metrics, dict):
                raise ValueError("recipe and metrics must be JSON objects")
            if fidelity is not None and not isinstance(fidelity, dict):
                raise ValueError("fidelity must be a JSON object")
            if row[5] not in ("ok", "failed") or not isinstance(row[1], int) or not isinstance(row[2], int):
                raise ValueError("generation, idx or status is malformed")
        except (TypeError, ValueError) as exc:
            raise UserError(
                f"{self.dir / DB_NAME}: journal row {row[0]} is malformed ({first_line(exc, 120)})"
            ) from None
        return Candidate(
            row[0], row[1], row[2], genome, recipe, row[5], row[6], fitness,
            metrics, row[9], row[10], row[11], row[12], fidelity,
        )  # fmt: skip

    # -- other evaluations of the search split -------------------------------------------------------

    def record_score(self, s: Score, items: dict[str, dict[str, Any]] | None = None) -> None:
        with self._tx() as db:
            meaning = (
                s.owner,
                s.status,
                s.reason,
                float(s.fitness),
                json.dumps(s.metrics),
                int(s.item_evals),
            )
            db.execute(
                "INSERT OR REPLACE INTO scores (owner, status, reason, fitness, metrics, item_evals, seconds, "
                "finished_at, checksum) VALUES (?,?,?,?,?,?,?,?,?)",
                (*meaning, s.seconds, s.finished_at, _checksum(meaning)),
            )
            db.execute("DELETE FROM items WHERE owner = ?", (s.owner,))
            _write_items(db, s.owner, items)

    @_readable
    def scores(self, prefix: str = "") -> list[Score]:
        try:
            rows = self.db.execute(
                "SELECT * FROM scores WHERE substr(owner, 1, ?) = ? ORDER BY owner", (len(prefix), prefix)
            ).fetchall()
        except sqlite3.OperationalError:  # a read-only open of an experiment older than the table
            return []
        out = []
        for r in rows:
            self._verify("score", r[0], r[:6], r[8] if len(r) > 8 else None, r[7] >= self._checksums()["at"])
            out.append(Score(r[0], r[1], r[2], float(r[3]), _json_object(r[4], r[0]), int(r[5]), r[6], r[7]))
        return out

    # -- finals --------------------------------------------------------------------------------------

    def record_final(self, f: Final, items: dict[str, dict[str, Any]] | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO finals VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    f.name, f.kind, f.candidate_id, json.dumps(f.recipe) if f.recipe is not None else None,
                    f.split, f.status, f.reason, f.fitness, json.dumps(f.metrics), f.seconds, f.finished_at,
                ),
            )  # fmt: skip
            db.execute("DELETE FROM items WHERE owner = ?", (f"final:{f.name}",))
            _write_items(db, f"final:{f.name}", items)

    @_readable
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
            names = [r[0] for r in db.execute("SELECT name FROM finals WHERE kind = ?", (kind,))]
            db.executemany("DELETE FROM items WHERE owner = ?", [(f"final:{n}",) for n in names])
            db.execute("DELETE FROM finals WHERE kind = ?", (kind,))

    # -- per-item results -------------------------------------------------------------------------------

    @_readable
    def items(self, owner: str) -> dict[str, ItemResults]:
        """Per-item results of `candidate:<id>` or `final:<name>`, by task (empty for evaluations journaled
        before per-item results existed)."""
        try:
            rows = self.db.execute(
                "SELECT task, metric, ids, vals FROM items WHERE owner = ? ORDER BY task", (owner,)
            ).fetchall()
        except sqlite3.OperationalError:  # a read-only open of an experiment older than the table
            return {}
        out = {}
        for task, metric, ids, vals in rows:
            ids_array = np.frombuffer(ids, dtype="<i4")
            vals_array = np.frombuffer(vals, dtype="<f8")
            if ids_array.shape != vals_array.shape:
                raise UserError(f"per-item results of {owner} ({task}) are malformed")
            out[task] = ItemResults(metric, ids_array.astype(np.int64), vals_array.astype(np.float64))
        return out


@dataclass
class ItemResults:
    """One task's per-item values of the metric that makes its fitness, by document index."""

    metric: str
    ids: np.ndarray
    values: np.ndarray


def _write_items(db: sqlite3.Connection, owner: str, items: dict[str, dict[str, Any]] | None) -> None:
    """Each task's items as two packed arrays (int32 document ids, float64 values): ~12 bytes an item."""
    for task, data in (items or {}).items():
        ids = np.asarray(data["ids"], dtype="<i4")
        vals = np.asarray(data["values"], dtype="<f8")
        if ids.shape != vals.shape:
            raise ValueError(f"{task}: {ids.size} item ids for {vals.size} values")
        db.execute(
            "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?)",
            (owner, task, data["metric"], ids.tobytes(), vals.tobytes()),
        )


def mark_staged(path: Path, stages: list[str]) -> None:
    """Mark `path` as a staged experiment whose stages run in this order (reports follow it)."""
    mark(path, STAGED, stages=list(stages))


def experiment_dirs(paths: list[Path]) -> list[tuple[Path, bool]]:
    """The experiments behind `paths`, each with whether it came from expanding a staged experiment: a
    staged experiment's directory stands for its stages (each an experiment directory inside it), in the
    order its marker lists them (then any others by name), never by file times."""
    out: list[tuple[Path, bool]] = []
    for path in paths:
        stages = []
        if path.is_dir() and not ExperimentStore.exists(path):
            order = (marker(path) or {}).get("stages") or []
            rank = {name: i for i, name in enumerate(order) if isinstance(name, str)}
            stages = sorted(
                (p for p in path.iterdir() if p.is_dir() and ExperimentStore.exists(p)),
                key=lambda p: (rank.get(p.name, len(rank)), p.name),
            )
        out += [(p, True) for p in stages] or [(path, False)]
    return out


def _checksum(meaning: tuple) -> str:
    """What a row means, hashed: the values as stored (text columns as their JSON text), so a reader
    recomputes it from the row itself."""
    import hashlib

    text = json.dumps(
        [None if isinstance(v, float) and math.isnan(v) else v for v in meaning], allow_nan=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _json_object(text: Any, owner: Any) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise UserError(f"journal entry {owner}: metrics are not a JSON object (the journal is damaged)")
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
