"""Where the fleet's shared state is written and read: the ledger.

What every replica must agree on is small: each adapter registration (a public name, its folder
relative to the shared adapters root, the content hash it must have, pinned) and the name of the
active index. A `Ledger` holds it. `LocalLedger` keeps it in this process's memory, which is
today's single-process lorag (the default, with LORAG_STORE=faiss); the Postgres ledger
(app/fleet/pg_ledger.py) keeps it in the database that every replica shares and tells them of
each change. `Fleet` (app/fleet/fleet.py) drives either the same way, so nothing above it
branches on which one it has.

Methods block (a database round trip); callers on the event loop run them in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Registration:
    name: str
    path: str  # relative to the adapters root, which every replica mounts
    version: str  # the adapter's content hash (app/lora/validate.py): what every replica serves
    pinned: bool = False


@dataclass(frozen=True)
class FleetSnapshot:
    adapters: Mapping[str, Registration] = field(default_factory=dict)
    active_index: str | None = None  # None: nobody chose one; each replica keeps its setting


class Ledger(Protocol):
    @property
    def shared(self) -> bool:
        """True when other processes read and write the same ledger."""
        ...

    def snapshot(self) -> FleetSnapshot: ...

    def put_adapter(self, reg: Registration) -> Registration | None:
        """Register (or replace) reg.name in one transaction; returns what it replaced."""
        ...

    def remove_adapter(self, name: str) -> Registration | None:
        """Unregister name; returns what was registered (None: nothing)."""
        ...

    def restore_adapter(self, name: str, previous: Registration | None) -> None:
        """Put back what put_adapter replaced (a local install that failed after the write)."""
        ...

    def set_active_index(self, name: str) -> None: ...

    def watch(self, on_change: Callable[[], None]) -> None:
        """Call on_change (from any thread) when another process may have changed the ledger,
        and now and then regardless; until close()."""
        ...

    def problem(self) -> str | None:
        """Why the ledger cannot be reached now (no secrets in it), or None."""
        ...

    def close(self) -> None: ...


class LocalLedger:
    """The ledger of one process: its memory. Nobody else writes it, so it never calls back."""

    shared = False

    def __init__(self) -> None:
        self._adapters: dict[str, Registration] = {}
        self._active: str | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> FleetSnapshot:
        with self._lock:
            return FleetSnapshot(dict(self._adapters), self._active)

    def put_adapter(self, reg: Registration) -> Registration | None:
        with self._lock:
            previous = self._adapters.get(reg.name)
            self._adapters[reg.name] = reg
        return previous

    def remove_adapter(self, name: str) -> Registration | None:
        with self._lock:
            return self._adapters.pop(name, None)

    def restore_adapter(self, name: str, previous: Registration | None) -> None:
        with self._lock:
            if previous is None:
                self._adapters.pop(name, None)
            else:
                self._adapters[name] = previous

    def set_active_index(self, name: str) -> None:
        with self._lock:
            self._active = name

    def watch(self, on_change: Callable[[], None]) -> None:
        return None

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        return None
