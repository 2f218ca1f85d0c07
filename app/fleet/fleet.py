"""One replica's side of the fleet: writes go to the ledger first, then apply here; changes that
other replicas wrote are followed.

Every replica runs the same loop over the same ledger (app/fleet/ledger.py):

- `PUT /adapters/x` validates the folder here, which gives its content hash (the version),
  registers (x, folder, version, pinned) in the ledger in one transaction, then installs it here.
  If the install fails (say, the adapter memory budget), the registration is put back as it was.
- Other replicas are told (LISTEN/NOTIFY with the Postgres ledger, or a periodic re-check when a
  notification was missed) and run `sync`: each registration whose version this replica has not
  applied is read from the shared adapters root, its content hash checked against the registered
  version, then installed; a copy that differs is never served under the name (a stale copy
  installed before is unloaded, and the error is logged and retried at each re-check, as the
  shared volume may still be catching up). Names no longer registered are unloaded.
- Unloads and swaps keep today's leases: requests already admitted finish on their version.
- The active index follows the same way. Each sync also refreshes the index size gauges
  (documents other replicas added or deleted: IndexManager.refresh).

One asyncio lock serializes this replica's own writes with `sync`, so a sync never sees a
registration whose local install is still running. With the LocalLedger nobody else writes,
nothing calls back, and the behaviour is today's single process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from app.errors import AdapterNotFound, LoragError
from app.fleet.ledger import FleetSnapshot, Ledger, Registration
from app.lora.registry import AdapterInfo, check_name

if TYPE_CHECKING:
    from app.retrieval.manager import IndexManager
    from app.service import RagService

log = logging.getLogger(__name__)


class Fleet:
    def __init__(self, service: RagService, indexes: IndexManager | None, ledger: Ledger) -> None:
        self._service = service
        self._indexes = indexes
        self.ledger = ledger
        self._snapshot = FleetSnapshot()
        self._applied: dict[str, str] = {}  # name -> registered version this replica serves
        self.failures: dict[str, str] = {}  # name -> why its registered version is not served here
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.syncs = 0  # completed syncs, for tests and metrics
        service.adapter_source = self  # lazy loads read the registered folder and version

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Apply the ledger once, then follow it (only a shared ledger changes under us)."""
        if not self.ledger.shared:
            return
        await self.sync()
        loop = asyncio.get_running_loop()

        def wake() -> None:  # on the ledger's thread
            loop.call_soon_threadsafe(self._wake.set)

        self.ledger.watch(wake)
        self._task = asyncio.create_task(self._follow(), name="lorag-fleet")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self.ledger.close)

    def problem(self) -> str | None:
        """Why this replica cannot follow the fleet now (for /ready), or None."""
        return self.ledger.problem()

    async def _follow(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()  # notifications that arrive during the sync wake one more
            try:
                await self.sync()
            except Exception:  # the next notification or re-check tries again
                log.exception("following the fleet's ledger failed")

    # ---- this replica's writes ----------------------------------------------------------

    async def load_adapter(
        self, name: str, path: str, *, pinned: bool = False
    ) -> tuple[AdapterInfo, bool]:
        check_name(name)
        load = await self._service.prepare_adapter(path)
        reg = Registration(name, path, load.version, pinned)
        async with self._lock:
            previous = await asyncio.to_thread(self.ledger.put_adapter, reg)
            try:
                result = await self._service.install_adapter(name, load, pinned=pinned)
            except LoragError:
                await asyncio.to_thread(self.ledger.restore_adapter, name, previous)
                raise
            self._applied[name] = reg.version
            self.failures.pop(name, None)
        return result

    async def unload_adapter(self, name: str) -> None:
        async with self._lock:
            previous = await asyncio.to_thread(self.ledger.remove_adapter, name)
            self._applied.pop(name, None)
            self.failures.pop(name, None)
            if name in self._service.registry:
                await self._service.unload_adapter(name)
            elif previous is None:
                raise AdapterNotFound(name)

    async def activate_index(self, name: str) -> None:
        if self._indexes is None:
            return
        async with self._lock:
            before = self._indexes.active
            await self._indexes.activate(name)  # refuses a missing or foreign index first
            try:
                await asyncio.to_thread(self.ledger.set_active_index, name)
            except LoragError:
                await self._indexes.activate(before)
                raise

    # ---- following the others -----------------------------------------------------------

    def locate(self, name: str) -> tuple[str, str | None]:
        """Where a lazy load of `name` reads (RagService.adapter_source): its registered
        folder at its registered version; without a shared ledger, the folder `name`."""
        reg = self._snapshot.adapters.get(name) if self.ledger.shared else None
        return (reg.path, reg.version) if reg is not None else (name, None)

    async def sync(self) -> None:
        """Make this replica serve what the ledger says."""
        try:
            snapshot = await asyncio.to_thread(self.ledger.snapshot)
        except LoragError as exc:  # the ledger says why in problem(); retried on the next wake
            log.warning("cannot read the fleet's ledger: %s", exc)
            return
        async with self._lock:
            self._snapshot = snapshot
            for reg in snapshot.adapters.values():
                if self._applied.get(reg.name) != reg.version:
                    await self._apply(reg)
            for name in [n for n in self._applied if n not in snapshot.adapters]:
                del self._applied[name]
                await self._drop(name, "unregistered")
            for name in [n for n in self.failures if n not in snapshot.adapters]:
                del self.failures[name]
            await self._follow_index(snapshot.active_index)
            if self._indexes is not None:  # documents other replicas added or deleted
                await self._indexes.refresh()
            self.syncs += 1

    async def _apply(self, reg: Registration) -> None:
        registry = self._service.registry
        if reg.name in registry:
            info = registry.get(reg.name)
            if info.version == reg.version and info.path == reg.path:
                self._applied[reg.name] = reg.version
                return
        try:
            load = await self._service.prepare_adapter(reg.path, expect_version=reg.version)
            await self._service.install_adapter(reg.name, load, pinned=reg.pinned)
        except LoragError as exc:
            if self.failures.get(reg.name) != str(exc):
                log.error("not serving adapter %r version %s: %s", reg.name, reg.version, exc)
            self.failures[reg.name] = str(exc)
            if reg.name in registry and registry.get(reg.name).version != reg.version:
                await self._drop(reg.name, f"stale: version {reg.version} is registered")
            return
        self._applied[reg.name] = reg.version
        self.failures.pop(reg.name, None)
        log.info(
            "following the fleet: adapter %r version %s from %s", reg.name, reg.version, reg.path
        )

    async def _drop(self, name: str, why: str) -> None:
        try:
            await self._service.unload_adapter(name)
        except AdapterNotFound:
            return
        log.info("following the fleet: unloaded adapter %r (%s)", name, why)

    async def _follow_index(self, name: str | None) -> None:
        if name is None or self._indexes is None or self._indexes.active == name:
            return
        try:
            await self._indexes.activate(name)
        except LoragError as exc:
            log.error("cannot follow the fleet's active index %r: %s", name, exc)
