"""One connection pool per replica, shared by the store and the fleet.

`Database.open` connects once, applies the migrations it is given (app.db.migrations), then
opens a psycopg_pool.ConnectionPool whose connections have pgvector's types registered and a
server-side statement timeout. Every failure to reach the server becomes DatabaseUnavailable
(HTTP 503), whose message names the server without its password (app.db.urls.redact).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool, PoolTimeout

from app.db.config import DatabaseConfig
from app.db.migrations import Migration, migrate
from app.db.urls import redact
from app.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


def _first_line(exc: BaseException, url: str) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    secret = psycopg.conninfo.conninfo_to_dict(url).get("password")
    return line.replace(str(secret), "***") if secret else line


def unavailable(config: DatabaseConfig, exc: BaseException) -> DatabaseUnavailable:
    """The 503 for exc, naming the server by its redacted URL."""
    url = config.url.get_secret_value()
    return DatabaseUnavailable(f"database {redact(url)} unavailable: {_first_line(exc, url)}")


def connect_kwargs(config: DatabaseConfig) -> dict[str, Any]:
    """libpq parameters every lorag connection gets (the pool's and a LISTEN connection's)."""
    options = f"-c statement_timeout={round(config.statement_timeout_s * 1000)}"
    return {"connect_timeout": max(1, round(config.connect_timeout_s)), "options": options}


def connect(config: DatabaseConfig, *, autocommit: bool = False) -> psycopg.Connection:
    """One connection outside the pool (a LISTEN thread's, a bulk load's), types registered."""
    try:
        conn = psycopg.connect(
            config.url.get_secret_value(), autocommit=autocommit, **connect_kwargs(config)
        )
    except psycopg.OperationalError as exc:
        raise unavailable(config, exc) from None
    register_vector(conn)
    return conn


@contextmanager
def advisory_lock(config: DatabaseConfig, key: int) -> Iterator[None]:
    """Hold the session-level advisory lock `key` for the body, on a connection of its own:
    whoever holds it, every other caller waits for it (no statement timeout on that wait: the
    holder may be building for minutes); a holder that dies drops its connection, which frees
    the lock. The keys are listed in app.db.migrations (MIGRATION_LOCK, DEMO_LOCK)."""
    with connect(config, autocommit=True) as conn:
        try:
            conn.execute("SET statement_timeout = 0")
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        except psycopg.OperationalError as exc:
            raise unavailable(config, exc) from None
        yield  # closing the connection releases the lock, whatever the body did


def _configure(conn: psycopg.Connection) -> None:
    register_vector(conn)  # vector and halfvec <-> numpy
    conn.commit()  # the type lookup opened a transaction; a pooled connection must be idle


class Database:
    """The replica's pool, and its config for messages and extra connections."""

    def __init__(self, config: DatabaseConfig, pool: ConnectionPool) -> None:
        self.config = config
        self.pool = pool

    @classmethod
    def open(cls, config: DatabaseConfig, migrations: Sequence[Migration] = ()) -> Database:
        """Migrate (once per database, however many replicas start together), then open the
        pool; blocks, so call it off the event loop. DatabaseUnavailable if unreachable."""
        try:
            with psycopg.connect(
                config.url.get_secret_value(), autocommit=True, **connect_kwargs(config)
            ) as conn:
                migrate(conn, migrations)
        except psycopg.OperationalError as exc:
            raise unavailable(config, exc) from None
        pool: ConnectionPool = ConnectionPool(
            config.url.get_secret_value(),
            kwargs=connect_kwargs(config),
            min_size=config.pool_min,
            max_size=config.pool_max,
            timeout=config.connect_timeout_s,
            configure=_configure,
            check=ConnectionPool.check_connection,  # a connection that died with a restart
            reconnect_timeout=0,  # never give up: the server may come back
            name="lorag",
            open=False,
        )
        try:
            pool.open(wait=True, timeout=config.connect_timeout_s)
        except PoolTimeout as exc:
            pool.close()
            raise unavailable(config, exc) from None
        log.info("database %s: pool of %d-%d", config.redacted, config.pool_min, config.pool_max)
        return cls(config, pool)

    def migrate(self, migrations: Sequence[Migration]) -> list[int]:
        """Apply more migrations (an owner that starts later); see app.db.migrations.migrate."""
        with self.connection() as conn:
            conn.commit()  # migrate opens its own transaction
            return migrate(conn, migrations)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection (the pool commits on a clean exit, rolls back on an error);
        DatabaseUnavailable when none comes within connect_timeout_s or the server drops."""
        try:
            with self.pool.connection(timeout=self.config.connect_timeout_s) as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise unavailable(self.config, exc) from None

    @property
    def redacted_url(self) -> str:
        return self.config.redacted

    def close(self) -> None:
        self.pool.close()
