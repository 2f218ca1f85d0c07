"""Database URLs as messages may show them: never the password.

A `postgresql://user:secret@host:5432/db?sslmode=require` URL reads, in logs, errors and
/health, as `postgresql://user:***@host:5432/db?sslmode=require`; a `password=` query or
keyword parameter is masked the same way.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import psycopg

_SCHEMES = ("postgresql", "postgres")
_QUERY_PASSWORD = re.compile(r"(?i)(password=)[^&\s]*")
_KEYWORD_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in _SCHEMES


def redact(url: str) -> str:
    """url with its password replaced by ***: a URI's user:password@ and any password=
    parameter, or a keyword conninfo's password=...; everything else kept for diagnosis."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub(r"\1***", url)
    scheme, _, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
    tail = _QUERY_PASSWORD.sub(r"\1***", tail)
    return f"{scheme}://{netloc}{slash}{tail}"


def describe_server(url: str) -> str:
    """The server as host[:port]/dbname (a socket folder for host), without user or password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable database URL)"
    host = str(info.get("host") or "localhost")
    port = info.get("port")
    return f"{host}{f':{port}' if port else ''}/{info.get('dbname') or info.get('user') or ''}"
