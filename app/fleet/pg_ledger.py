"""The fleet's ledger in PostgreSQL: every replica reads and writes the same two tables, and
hears of each change on one LISTEN/NOTIFY channel.

Writes are one transaction each, with `pg_notify` inside it, so the notification goes out at
commit and only then. Every replica holds one dedicated connection (its own thread, not the
pool's) that LISTENs; each notification, and every `recheck_s` regardless (a notification sent
while a replica was reconnecting is lost: NOTIFY is not queued for absent listeners), calls the
fleet back, which re-reads the whole ledger: a few rows, and idempotent. When the connection
drops the thread says why in `problem()` and reconnects with a growing pause (up to 2 s); once
connected it calls back at once, so a replica that missed changes catches up by itself.

Database errors become DatabaseUnavailable (HTTP 503) naming the server without its password.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from app.db.config import DatabaseConfig
from app.db.migrations import Migration
from app.db.pool import Database, connect, unavailable
from app.errors import DatabaseUnavailable
from app.fleet.ledger import FleetSnapshot, Registration

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "lorag_fleet"

# migrations 2xx belong to the fleet; app.db applies them in order, once, under its lock
FLEET_MIGRATIONS = [
    Migration(
        201,
        "fleet ledger: adapter registrations and the active index",
        sql="""
        CREATE TABLE lorag_adapters (
            name text PRIMARY KEY,
            path text NOT NULL,
            version text NOT NULL,
            pinned boolean NOT NULL DEFAULT false,
            registered_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE lorag_fleet (
            id boolean PRIMARY KEY DEFAULT true CHECK (id),
            active_index text
        );
        INSERT INTO lorag_fleet (id, active_index) VALUES (true, NULL);
        """,
    ),
]


class PostgresLedger:
    shared = True

    @classmethod
    def open(cls, config: DatabaseConfig, *, recheck_s: float) -> PostgresLedger:
        """The database opened with the fleet's migrations applied; DatabaseUnavailable if it
        cannot be reached (blocks)."""
        return cls(Database.open(config, FLEET_MIGRATIONS), recheck_s=recheck_s, owns_db=True)

    def __init__(self, db: Database, *, recheck_s: float = 5.0, owns_db: bool = False) -> None:
        """db: the replica's database (its pool); the listener opens one more connection."""
        self._db = db
        self._pool = db.pool
        self._timeout_s = db.config.connect_timeout_s
        self._recheck_s = recheck_s
        self._owns_db = owns_db
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listen_problem: str | None = "not listening yet"
        self._op_problem: str | None = None

    # ---- reads and writes (any thread; each one transaction) -----------------------------

    def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """work(conn) in one transaction. A connection that died with the server before a
        restart fails once and leaves the pool, so one retry on a fresh one follows (every
        write here is idempotent: an upsert, a delete, a notify)."""
        for attempt in (1, 2):
            try:
                with self._pool.connection(timeout=self._timeout_s) as conn, conn.transaction():
                    result = work(conn)
            except psycopg.OperationalError as exc:
                if attempt == 1:
                    continue
                problem = exc
            except PoolTimeout as exc:
                problem = exc
            else:
                self._op_problem = None
                return result
            break
        self._op_problem = self._unavailable(problem)
        raise DatabaseUnavailable(self._op_problem) from None

    def _unavailable(self, exc: BaseException) -> str:
        if isinstance(exc, DatabaseUnavailable):  # app.db said it already
            return str(exc)
        return str(unavailable(self._db.config, exc))  # the password redacted

    def snapshot(self) -> FleetSnapshot:
        def read(conn: psycopg.Connection) -> FleetSnapshot:
            rows = conn.execute("SELECT name, path, version, pinned FROM lorag_adapters").fetchall()
            active = conn.execute("SELECT active_index FROM lorag_fleet").fetchone()
            adapters = {r[0]: Registration(r[0], r[1], r[2], r[3]) for r in rows}
            return FleetSnapshot(adapters, active[0] if active else None)

        return self._run(read)

    def put_adapter(self, reg: Registration) -> Registration | None:
        def put(conn: psycopg.Connection) -> Registration | None:
            previous = self._lock_row(conn, reg.name)
            conn.execute(
                "INSERT INTO lorag_adapters (name, path, version, pinned) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET path = excluded.path, "
                "version = excluded.version, pinned = excluded.pinned, registered_at = now()",
                (reg.name, reg.path, reg.version, reg.pinned),
            )
            self._notify(conn, {"adapter": reg.name})
            return previous

        return self._run(put)

    def remove_adapter(self, name: str) -> Registration | None:
        def remove(conn: psycopg.Connection) -> Registration | None:
            previous = self._lock_row(conn, name)
            conn.execute("DELETE FROM lorag_adapters WHERE name = %s", (name,))
            self._notify(conn, {"adapter": name})
            return previous

        return self._run(remove)

    def restore_adapter(self, name: str, previous: Registration | None) -> None:
        if previous is not None:
            self.put_adapter(previous)
            return
        self.remove_adapter(name)

    def set_active_index(self, name: str) -> None:
        def activate(conn: psycopg.Connection) -> None:
            conn.execute("UPDATE lorag_fleet SET active_index = %s", (name,))
            self._notify(conn, {"index": name})

        self._run(activate)

    @staticmethod
    def _lock_row(conn: psycopg.Connection, name: str) -> Registration | None:
        row = conn.execute(
            "SELECT name, path, version, pinned FROM lorag_adapters WHERE name = %s FOR UPDATE",
            (name,),
        ).fetchone()
        return Registration(row[0], row[1], row[2], row[3]) if row else None

    @staticmethod
    def _notify(conn: psycopg.Connection, what: dict[str, str]) -> None:
        # delivered at commit, to every listener (this replica's too: its sync is a no-op)
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(what)))

    # ---- listening (its own thread and connection) ---------------------------------------

    def watch(self, on_change: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("the ledger is watched already")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._listen, args=(on_change,), name="lorag-fleet-listen", daemon=True
        )
        self._thread.start()

    def problem(self) -> str | None:
        return self._listen_problem or self._op_problem

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._owns_db:
            self._db.close()

    def _listen(self, on_change: Callable[[], None]) -> None:
        pause = 0.1
        while not self._stop.is_set():
            try:
                self._listen_once(on_change)
            # connect() raises DatabaseUnavailable; a dropped connection, psycopg.Error
            except (DatabaseUnavailable, psycopg.Error) as exc:
                problem = self._unavailable(exc)
                if problem != self._listen_problem:
                    log.warning("fleet listener: %s; reconnecting", problem)
                pause = 0.1 if self._listen_problem is None else min(pause * 2, 2.0)
                self._listen_problem = problem
            self._stop.wait(pause)
        self._listen_problem = "stopped"

    def _listen_once(self, on_change: Callable[[], None]) -> None:
        with connect(self._db.config, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            if self._listen_problem is not None:
                log.info("fleet listener: listening on %s", self._db.redacted_url)
            self._listen_problem = None
            on_change()  # whatever changed while nobody here listened
            last = time.monotonic()
            while not self._stop.is_set():
                for _ in conn.notifies(timeout=0.5):
                    on_change()  # the fleet coalesces a burst into one sync
                if time.monotonic() - last >= self._recheck_s:
                    conn.execute("SELECT 1")  # a dead connection raises here, not silently
                    on_change()
                    last = time.monotonic()
