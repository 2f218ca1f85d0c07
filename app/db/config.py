"""The database's own frozen config, built from Settings by app/settings.py."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretStr

from app.db.urls import is_postgres_url, redact


@dataclass(frozen=True)
class DatabaseConfig:
    url: SecretStr  # postgresql://...; repr and str show **********
    connect_timeout_s: float = 5.0  # a new connection, and the wait for a pooled one
    statement_timeout_s: float = 30.0  # any one statement (server-side), 0: none
    pool_min: int = 1
    pool_max: int = 8

    def __post_init__(self) -> None:
        url = self.url.get_secret_value()
        if not is_postgres_url(url):
            raise ValueError(f"database URL {redact(url)!r} is not a postgresql:// URL")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        if self.statement_timeout_s < 0:
            raise ValueError(f"statement_timeout_s must be >= 0, got {self.statement_timeout_s}")
        if not 1 <= self.pool_min <= self.pool_max:
            raise ValueError(
                f"need 1 <= pool_min <= pool_max, got pool_min={self.pool_min}, "
                f"pool_max={self.pool_max}"
            )

    @property
    def redacted(self) -> str:
        return redact(self.url.get_secret_value())
