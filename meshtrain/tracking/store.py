"""The run store: one SQLite file per node, ``$MESHTRAIN_HOME/runs.sqlite``.

Why SQLite: it needs no server, the standard library has it, and in WAL mode
the agent can write a running job's metrics while `meshtrain runs` reads the
same file from another process without either waiting on the other.

Three tables:

- ``runs``: one row per run (a job): settings and outcome as columns, the
  structured parts (arguments, options, mesh composition, hyper-parameters,
  checkpoints) as JSON text. ``updated`` orders the writers: a replica only
  takes a row newer than the one it holds, so copies converge whatever order
  the pushes arrive in.
- ``metrics``: one row per reported value, unique by (run, worker, the
  worker's timestamp of the report, metric), so a value that arrives twice (a
  push retried, a report resent to a new coordinator) is kept once; ``seq``
  (a recorder's running number, starting from its start time in ms << 20, so a
  later coordinator's rows sort after an earlier one's) orders pushes.
- ``tags``: model versions, ``NAME -> (checkpoint run, step)``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtrain import env as env_names
from meshtrain.errors import UserError

DB_NAME = "runs.sqlite"
BUSY_TIMEOUT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    script TEXT NOT NULL DEFAULT '',
    args TEXT NOT NULL DEFAULT '[]',
    options TEXT NOT NULL DEFAULT '{}',
    bundle_hash TEXT NOT NULL DEFAULT '',
    git TEXT NOT NULL DEFAULT '{}',
    mesh TEXT NOT NULL DEFAULT '{}',
    params TEXT NOT NULL DEFAULT '{}',
    checkpoints TEXT NOT NULL DEFAULT '[]',
    sweep TEXT,
    coordinator TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL DEFAULT 0,
    ended REAL,
    state TEXT NOT NULL DEFAULT 'running',
    reason TEXT,
    updated REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_name ON runs(name);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs(sweep);
CREATE TABLE IF NOT EXISTS metrics (
    run TEXT NOT NULL,
    seq INTEGER NOT NULL,
    member TEXT NOT NULL,
    step INTEGER,
    t REAL NOT NULL,
    key TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run, member, t, key)
);
CREATE INDEX IF NOT EXISTS metrics_key ON metrics(run, key, step);
CREATE INDEX IF NOT EXISTS metrics_seq ON metrics(run, seq);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT PRIMARY KEY,
    run TEXT NOT NULL,
    ckpt_run TEXT NOT NULL,
    step INTEGER NOT NULL,
    created REAL NOT NULL
);
"""

JSON_COLUMNS = ("args", "options", "git", "mesh", "params", "checkpoints")
COLUMNS = (
    "id",
    "name",
    "script",
    "args",
    "options",
    "bundle_hash",
    "git",
    "mesh",
    "params",
    "checkpoints",
    "sweep",
    "coordinator",
    "started",
    "ended",
    "state",
    "reason",
    "updated",
)


def runs_db_path(home: Path | None = None) -> Path:
    """``$MESHTRAIN_HOME/runs.sqlite`` (or ``~/.local/state/meshtrain/runs.sqlite``)."""
    if home is None:
        env = os.environ.get(env_names.HOME)
        home = Path(env) if env else Path.home() / ".local" / "state" / "meshtrain"
    return home / DB_NAME


@dataclass
class Run:
    """One run as stored; JSON columns decoded."""

    id: str
    name: str
    script: str = ""
    args: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    bundle_hash: str = ""
    git: dict[str, Any] = field(default_factory=dict)
    mesh: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[Any] = field(default_factory=list)
    sweep: str | None = None
    coordinator: str = ""
    started: float = 0.0
    ended: float | None = None
    state: str = "running"
    reason: str | None = None
    updated: float = 0.0

    def to_row(self) -> dict[str, Any]:
        return {
            c: json.dumps(getattr(self, c), sort_keys=True) if c in JSON_COLUMNS else getattr(self, c)
            for c in COLUMNS
        }

    @staticmethod
    def from_row(row: sqlite3.Row | dict[str, Any]) -> Run:
        data = {c: row[c] for c in COLUMNS}
        for c in JSON_COLUMNS:
            try:
                data[c] = json.loads(data[c]) if data[c] else ({} if c not in ("args", "checkpoints") else [])
            except (TypeError, ValueError):
                data[c] = {} if c not in ("args", "checkpoints") else []
        return Run(**data)

    @property
    def duration(self) -> float | None:
        end = self.ended if self.ended is not None else (time.time() if self.state == "running" else None)
        return None if end is None or not self.started else max(0.0, end - self.started)


@dataclass(frozen=True)
class MetricRow:
    seq: int
    member: str
    step: int | None
    t: float
    key: str
    value: float

    def to_list(self) -> list[Any]:
        return [self.seq, self.member, self.step, self.t, self.key, self.value]

    @staticmethod
    def from_list(item: Sequence[Any]) -> MetricRow:
        seq, member, step, t, key, value = item
        return MetricRow(
            int(seq), str(member), None if step is None else int(step), float(t), str(key), float(value)
        )


class RunStore:
    """The SQLite file of one node; cheap to open, safe to share between processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise UserError(f"cannot open the run store {path}: {exc}") from None

    @staticmethod
    def open(home: Path | None = None) -> RunStore:
        return RunStore(runs_db_path(home))

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writing
    def put_run(self, run: Run, *, force: bool = False) -> bool:
        """Insert or replace `run`; a replica keeps a newer row it holds (unless `force`). True if taken."""
        row = run.to_row()
        names = ", ".join(COLUMNS)
        marks = ", ".join(f":{c}" for c in COLUMNS)
        updates = ", ".join(f"{c}=excluded.{c}" for c in COLUMNS if c != "id")
        where = "" if force else " WHERE excluded.updated >= runs.updated"
        cur = self._db.execute(
            f"INSERT INTO runs ({names}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {updates}{where}", row
        )
        return cur.rowcount > 0

    def add_metrics(self, run: str, rows: Iterable[MetricRow]) -> int:
        """Insert metric rows (a value already held is ignored); how many were new."""
        data = [(run, r.seq, r.member, r.step, r.t, r.key, r.value) for r in rows]
        if not data:
            return 0
        before = self._db.total_changes
        self._db.execute("BEGIN")
        try:
            self._db.executemany("INSERT OR IGNORE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)", data)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return self._db.total_changes - before

    def remove(self, run_id: str) -> None:
        self._db.execute("BEGIN")
        self._db.execute("DELETE FROM metrics WHERE run = ?", (run_id,))
        self._db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ reading
    def get(self, run_id: str) -> Run | None:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return Run.from_row(row) if row is not None else None

    def runs(
        self, *, name: str | None = None, state: str | None = None, sweep: str | None = None
    ) -> list[Run]:
        """Runs, oldest first; `name` matches a glob (``mnist*``)."""
        sql, args = "SELECT * FROM runs WHERE 1=1", []
        if name:
            sql += " AND name GLOB ?"
            args.append(name)
        if state:
            sql += " AND state = ?"
            args.append(state)
        if sweep:
            sql += " AND sweep = ?"
            args.append(sweep)
        rows = self._db.execute(sql + " ORDER BY started, id", args).fetchall()
        return [Run.from_row(r) for r in rows]

    def resolve(self, text: str) -> Run:
        """A run by id, unique id prefix, or name (the newest run of that name); UserError if none."""
        run = self.get(text)
        if run is not None:
            return run
        rows = self._db.execute(
            "SELECT * FROM runs WHERE id LIKE ? ORDER BY started", (text + "%",)
        ).fetchall()
        if len(rows) == 1:
            return Run.from_row(rows[0])
        if len(rows) > 1:
            ids = ", ".join(r["id"] for r in rows[:5])
            raise UserError(f"run {text!r} is ambiguous: {ids}")
        row = self._db.execute(
            "SELECT * FROM runs WHERE name = ? ORDER BY started DESC LIMIT 1", (text,)
        ).fetchone()
        if row is not None:
            return Run.from_row(row)
        raise UserError(f"no run {text!r} here (see `meshtrain runs`)")

    def metrics(self, run_id: str, *, after_seq: int = -1, key: str | None = None) -> list[MetricRow]:
        sql, args = "SELECT * FROM metrics WHERE run = ? AND seq > ?", [run_id, after_seq]
        if key is not None:
            sql += " AND key = ?"
            args.append(key)
        rows = self._db.execute(sql + " ORDER BY seq", args).fetchall()
        return [MetricRow(r["seq"], r["member"], r["step"], r["t"], r["key"], r["value"]) for r in rows]

    def max_seq(self, run_id: str) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM metrics WHERE run = ?", (run_id,)).fetchone()
        return int(row[0]) if row and row[0] is not None else -1

    def metric_keys(self, run_id: str) -> list[str]:
        rows = self._db.execute("SELECT DISTINCT key FROM metrics WHERE run = ? ORDER BY key", (run_id,))
        return [r[0] for r in rows]

    def final_metrics(self, run_id: str) -> dict[str, float]:
        """Each metric's last value: at the highest step, the mean over the workers that reported it there."""
        rows = self._db.execute(
            """SELECT m.key, AVG(m.value) FROM metrics m
               JOIN (SELECT key, MAX(COALESCE(step, -1)) AS s FROM metrics WHERE run = ? GROUP BY key) last
               ON m.key = last.key AND COALESCE(m.step, -1) = last.s
               WHERE m.run = ? GROUP BY m.key ORDER BY m.key""",
            (run_id, run_id),
        ).fetchall()
        return {r[0]: float(r[1]) for r in rows}

    def series(self, run_id: str, key: str) -> list[tuple[int, float, float]]:
        """(step, time, value) of one metric: per step the mean over the workers (step-less rows by time)."""
        rows = self._db.execute(
            """SELECT step, MIN(t), AVG(value) FROM metrics WHERE run = ? AND key = ? AND step IS NOT NULL
               GROUP BY step ORDER BY step""",
            (run_id, key),
        ).fetchall()
        return [(int(r[0]), float(r[1]), float(r[2])) for r in rows]

    # ------------------------------------------------------------------ tags
    def put_tag(self, name: str, run: str, ckpt_run: str, step: int, created: float | None = None) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
            (name, run, ckpt_run, int(step), created if created is not None else time.time()),
        )

    def tag(self, name: str) -> tuple[str, str, int] | None:
        """(run id, checkpoint run, step) of tag `name`."""
        row = self._db.execute("SELECT run, ckpt_run, step FROM tags WHERE name = ?", (name,)).fetchone()
        return (row[0], row[1], int(row[2])) if row is not None else None

    def tags(self) -> list[tuple[str, str, str, int, float]]:
        rows = self._db.execute("SELECT name, run, ckpt_run, step, created FROM tags ORDER BY created")
        return [(r[0], r[1], r[2], int(r[3]), float(r[4])) for r in rows]

    def remove_tag(self, name: str) -> bool:
        return self._db.execute("DELETE FROM tags WHERE name = ?", (name,)).rowcount > 0
