"""Versioned schema migrations, applied at start, each exactly once per database.

A migration is a numbered SQL script or a Python function of a connection. Version ranges
belong to owners: 1xx the passage store (app/retrieval), 2xx the fleet (app/fleet). Each
owner keeps its own list and hands it to `migrate`; what a database has applied is recorded
in `lorag_schema_migrations`.

Replicas that start together all call `migrate`: the first takes a transaction-scoped advisory
lock and applies what is missing, the others wait on the lock, then find every version
recorded and apply nothing. All of one call's migrations run in that one transaction, so a
replica killed half way leaves none of them applied (PostgreSQL's DDL is transactional).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import psycopg

log = logging.getLogger(__name__)

# advisory lock keys, one per purpose, so no two purposes ever wait on each other
MIGRATION_LOCK = 0x6C6F726D  # "lorm": applying migrations (pg_advisory_xact_lock)
DEMO_LOCK = 0x6C6F6465  # "lode": building the demo index in the database (wiring.prepare)

_LEDGER = """
    CREATE TABLE IF NOT EXISTS lorag_schema_migrations (
        version int PRIMARY KEY,
        name text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""


@dataclass(frozen=True)
class Migration:
    """One schema step; sql or apply (a function of the open transaction's connection)."""

    version: int
    name: str  # what it does, recorded beside the version
    sql: str | None = None  # a script of one or more statements
    apply: Callable[[psycopg.Connection], None] | None = None  # or a function

    def __post_init__(self) -> None:
        if self.version <= 0:
            raise ValueError(f"migration {self.name!r}: version must be > 0, got {self.version}")
        if (self.sql is None) == (self.apply is None):
            raise ValueError(f"migration {self.version} ({self.name}): give sql or apply, one")

    def run(self, conn: psycopg.Connection) -> None:
        if self.sql is not None:
            conn.execute(self.sql.encode())  # bytes: a script, no parameters parsed
        else:
            assert self.apply is not None
            self.apply(conn)


def _pgvector(conn: psycopg.Connection) -> None:
    # checked first: on a managed server the extension may be installed by an admin and
    # CREATE EXTENSION refused to lorag's role
    if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
        conn.execute("CREATE EXTENSION vector")


# version 1 is app.db's own: every database gets pgvector before the pools register its types
BASE = (Migration(1, "pgvector extension", apply=_pgvector),)


def check(migrations: Iterable[Migration]) -> list[Migration]:
    """migrations in version order; ValueError naming a version given twice."""
    ordered = sorted(migrations, key=lambda m: m.version)
    for a, b in itertools.pairwise(ordered):
        if a.version == b.version:
            raise ValueError(f"migration version {a.version} given twice: {a.name!r}, {b.name!r}")
    return ordered


def applied_versions(conn: psycopg.Connection) -> set[int]:
    row = conn.execute("SELECT to_regclass('lorag_schema_migrations')").fetchone()
    if row is None or row[0] is None:
        return set()
    return {r[0] for r in conn.execute("SELECT version FROM lorag_schema_migrations")}


def migrate(conn: psycopg.Connection, migrations: Sequence[Migration]) -> list[int]:
    """Apply those of migrations this database lacks, in version order, in one transaction
    under the advisory lock; returns the versions this call applied (none when another
    replica got there first). conn must not be inside a transaction already."""
    ordered = check([*BASE, *migrations])
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(_LEDGER)
        done = applied_versions(conn)
        applied: list[int] = []
        for m in ordered:
            if m.version in done:
                continue
            m.run(conn)
            conn.execute(
                "INSERT INTO lorag_schema_migrations (version, name) VALUES (%s, %s)",
                (m.version, m.name),
            )
            applied.append(m.version)
            log.info("applied migration %d (%s)", m.version, m.name)
    unknown = done - {m.version for m in ordered}
    if unknown and applied:
        log.debug("database also has migrations %s from other owners", sorted(unknown))
    return applied
