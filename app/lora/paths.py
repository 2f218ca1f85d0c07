"""Resolve a client-given adapter path under the adapters root, and nowhere else.

The path is checked as text first (absolute, '..', empty, control characters), then resolved
with symlinks followed and required to stay under the resolved root: a link inside the root
that points outside it is refused like '..' would be.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from app.errors import AdapterPathNotFound, UnsafePath


def resolve_under(root: Path, rel: str) -> Path:
    """The real path of root/rel; UnsafePath if it could leave root, AdapterPathNotFound if
    it does not exist."""
    if not rel or not rel.strip() or not PurePosixPath(rel).parts:
        raise UnsafePath(f"adapter path {rel!r} is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise UnsafePath(f"adapter path {rel!r} contains a control character")
    if "\\" in rel:
        raise UnsafePath(f"adapter path {rel!r} contains a backslash; use '/'")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or Path(rel).is_absolute():
        raise UnsafePath(f"adapter path {rel!r} is absolute; give it relative to the root")
    if ".." in pure.parts:
        raise UnsafePath(f"adapter path {rel!r} contains '..'")
    real_root = root.resolve()
    candidate = real_root / pure
    real = candidate.resolve()  # follows symlinks; a missing tail stays as written
    if real != real_root and real_root not in real.parents:
        raise UnsafePath(f"adapter path {rel!r} resolves outside the adapters root")
    if not real.exists():
        raise AdapterPathNotFound(rel)
    return real
