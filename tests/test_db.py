"""app/db against the session's real PostgreSQL: redaction, migrations once under concurrency,
the pool's pgvector types, and a 503 that names the server without its password."""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest
from pydantic import SecretStr

from app.db.config import DatabaseConfig
from app.db.migrations import Migration, migrate
from app.db.pool import Database
from app.db.urls import redact
from app.errors import DatabaseUnavailable


def test_redact_hides_every_password_form() -> None:
    assert redact("postgresql://bob:s3cr%40t@db:5432/lorag?sslmode=require") == (
        "postgresql://bob:***@db:5432/lorag?sslmode=require"
    )
    assert redact("postgresql://db/lorag?user=bob&password=s3cret&x=1") == (
        "postgresql://db/lorag?user=bob&password=***&x=1"
    )
    assert redact("host=db password='a b' user=bob") == "host=db password=*** user=bob"
    assert redact("postgresql://bob@db/lorag") == "postgresql://bob@db/lorag"


def test_config_refuses_other_schemes_without_echoing_the_password() -> None:
    with pytest.raises(ValueError, match=r"mysql://u:\*\*\*@h/d") as err:
        DatabaseConfig(SecretStr("mysql://u:hunter2@h/d"))
    assert "hunter2" not in str(err.value)
    assert "hunter2" not in repr(DatabaseConfig(SecretStr("postgresql://u:hunter2@h/d")))


def _counter(conn: psycopg.Connection) -> None:
    conn.execute("INSERT INTO runs DEFAULT VALUES")


MIGRATIONS = [
    Migration(101, "runs", sql="CREATE TABLE runs (id serial PRIMARY KEY)"),
    Migration(102, "count a run", apply=_counter),
]


def test_replicas_starting_together_apply_each_migration_once(pg_url: str) -> None:
    applied: list[list[int]] = []
    barrier = threading.Barrier(4)

    def replica() -> None:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            barrier.wait()
            applied.append(migrate(conn, MIGRATIONS))

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(tuple, applied)) == [(), (), (), (1, 101, 102)]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (1,)
        versions = conn.execute("SELECT version FROM lorag_schema_migrations ORDER BY 1")
        assert [r[0] for r in versions] == [1, 101, 102]


def test_a_failing_migration_applies_nothing(pg_url: str) -> None:
    bad = [*MIGRATIONS, Migration(103, "broken", sql="CREATE TABLE runs (id int)")]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DuplicateTable):
            migrate(conn, bad)
        assert conn.execute("SELECT to_regclass('runs')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('lorag_schema_migrations')").fetchone() == (None,)


def test_duplicate_versions_are_refused_by_number() -> None:
    with pytest.raises(ValueError, match="version 101 given twice"):
        migrate(None, [MIGRATIONS[0], Migration(101, "again", sql="SELECT 1")])  # type: ignore[arg-type]


def test_pool_reads_and_writes_vectors(pg_url: str) -> None:
    db = Database.open(DatabaseConfig(SecretStr(pg_url)), MIGRATIONS)
    try:
        with db.connection() as conn:
            conn.execute("CREATE TABLE v (e vector(3))")
            conn.execute("INSERT INTO v VALUES (%s)", (np.array([1, 2, 3], dtype=np.float32),))
            (got,) = conn.execute("SELECT e FROM v").fetchone()  # type: ignore[misc]
        assert np.array_equal(got.to_numpy(), [1, 2, 3])
        with db.connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("30s",)
    finally:
        db.close()


def test_unreachable_database_is_a_503_without_the_password(tmp_path) -> None:
    url = f"postgresql://lorag:hunter2@/nodb?host={tmp_path}"
    with pytest.raises(DatabaseUnavailable) as err:
        Database.open(DatabaseConfig(SecretStr(url), connect_timeout_s=1))
    assert "hunter2" not in str(err.value)
    assert "lorag:***@" in str(err.value)


def test_pool_recovers_after_a_server_restart(pg_server, pg_url: str) -> None:
    db = Database.open(DatabaseConfig(SecretStr(pg_url), connect_timeout_s=2))
    try:
        pg_server.stop()
        try:
            with pytest.raises(DatabaseUnavailable), db.connection() as conn:
                conn.execute("SELECT 1")
        finally:
            pg_server.start()
        with db.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        db.close()
