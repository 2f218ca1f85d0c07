"""The adapters installed in the generator, by public name.

Each public name maps to an internal PEFT adapter name ("lorag1", "lorag2", ...) that is never
reused. Replacing a name installs the new adapter under a fresh internal name, swaps the
mapping, then deletes the old one: until the swap the old adapter serves, and if any step of
the install fails it goes on serving. Rows name internal adapters (GenRow.adapter), so the
engine must look them up with peft_name() when it forms a batch, on the model thread.

The PEFT surgery on the generator's model is PeftHost's (app/lora/peft_host.py): it wraps the
base into a PeftModel on the first install and unwraps it when the last adapter goes, so a
registry with nothing installed serves the plain base model at full speed. This module keeps
the books (names, versions, leases, residency) and says when the surgery runs.

Residency (app/lora/residency.py): an install that would overrun the memory budget first evicts
the least recently used adapters that are neither pinned nor held by queued requests, or is
refused with nothing evicted. With merge_single, the one installed adapter is merged into the
base weights while every row of every batch asks for it (LoRA's zero added latency), and
unmerged before any batch with a base row, and before any install or unload. While merged, the
generator serves the plain transformers model (its LoRA layers merged), and peft_name() says
None: rows must not pass PEFT adapter_names, which merged layers refuse.

Leases: a request admitted with an adapter takes a lease on the version installed at that
moment (`acquire()`, given back with `release()`), and its row runs on exactly those weights.
Replacing or unloading the name takes it out of the name map at once (later requests get the
new version, or a 404 or a lazy load), but weights still leased stay installed, "retired",
until the last lease is returned; the next call on the model thread then deletes them. So a
request is never failed, nor moved to other weights, by a swap or an unload that came after it
was admitted, however long it waits for its batch (what LoRAX and S-LoRA do with
reference-counted adapters).

Threads: prepare/get/list/peft_name/hold/acquire/release may run anywhere; install, unload and
begin_batch mutate the model and must run on the thread that runs generation (the engine
serializes them with batches). A lock guards only the name map and the usage counters, so
readers on other threads never see them half-updated.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from app.contracts import NAME_RE, AdapterHost
from app.errors import AdapterNotFound, InvalidInputError
from app.lora.paths import resolve_under
from app.lora.peft_host import PeftHost
from app.lora.residency import ResidencyPolicy, Resident, plan_eviction
from app.lora.validate import BaseLayout, ValidatedAdapter, describe, validate_adapter

log = logging.getLogger(__name__)

PreparedAdapter = ValidatedAdapter  # what prepare() hands to install()


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str  # as given, relative to the adapters root
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str | None  # base_model_name_or_path from the adapter's config
    bytes: int
    loaded_at: datetime
    version: str  # content hash of its config and safetensors (validate.content_version)
    resident_bytes: int  # LoRA weights as the model holds them (its dtype), what the budget counts
    pinned: bool = False
    last_used: datetime | None = None  # when a batch last ran a row with it
    requests_served: int = 0


@dataclass
class _Entry:
    info: AdapterInfo  # the static part; usage fields live below
    internal: str
    pinned: bool
    tick: int  # last install or use, for LRU
    last_used: datetime | None = None
    served: int = 0

    def snapshot(self) -> AdapterInfo:
        return replace(
            self.info, pinned=self.pinned, last_used=self.last_used, requests_served=self.served
        )


@dataclass(frozen=True)
class Lease:
    """The adapter version a request runs with (see the module docstring)."""

    name: str
    internal: str
    version: str


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInputError(
            f"adapter name {name!r} is invalid: use 1-64 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )


class AdapterRegistry:
    def __init__(
        self,
        generator: AdapterHost,
        root: Path,
        *,
        on_change: Callable[[torch.nn.Module], None] | None = None,
        policy: ResidencyPolicy | None = None,
    ) -> None:
        """on_change(model) runs on the model thread after each install/unload/eviction and
        merge/unmerge, with the model now serving (a PeftModel, or a plain transformers model
        after the last unload or while merged): the hook for anything that caches per-adapter
        state, such as stacked LoRA weights."""
        self._peft = PeftHost(generator)  # refuses a generator that holds a PeftModel already
        self.generator = generator  # its .model is the PeftHost's to swap from now on
        self.root = root
        self._layout = BaseLayout.of(generator.model, generator.kind, generator.model_id)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._on_change = on_change
        self.policy = policy or ResidencyPolicy()
        self._held: Counter[str] = Counter()  # name -> requests admitted that name it
        self._leases: Counter[str] = Counter()  # internal name -> requests bound to it
        self._retired: dict[str, _Entry] = {}  # internal -> replaced/unloaded, still leased
        self._doomed: list[str] = []  # retired internals no longer leased: delete on model thread
        self._ticks = itertools.count(1)
        self.evictions = 0  # running total, read by the metrics layer

    # ---- any thread ---------------------------------------------------------------------

    def prepare(self, rel_path: str) -> PreparedAdapter:
        """Read and validate the adapter at root/rel_path; touches no model state."""
        folder = resolve_under(self.root, rel_path)
        return validate_adapter(folder, self.root, self._layout, rel=rel_path)

    def get(self, name: str) -> AdapterInfo:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFound(name)
            return entry.snapshot()

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._entries[n].snapshot() for n in sorted(self._entries)]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def peft_name(self, name: str) -> str | None:
        """The PEFT adapter name a row for `name` passes, or None while it is merged into the
        weights the model serves (then every row is that adapter's; see begin_batch)."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(name)
        return None if entry.internal == self._peft.merged else entry.internal

    @property
    def merged(self) -> str | None:
        """The public name merged into the base weights, if any."""
        with self._lock:
            for name, entry in self._entries.items():
                if entry.internal == self._peft.merged:
                    return name
        return None

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """While held (a request naming it is admitted), `name` is never evicted; it need not
        be loaded yet (a lazy load runs inside the hold)."""
        with self._lock:
            self._held[name] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[name] -= 1
                if self._held[name] <= 0:
                    del self._held[name]

    def acquire(self, name: str) -> Lease:
        """Bind a request to the version of `name` installed now; give it back with release().
        Raises AdapterNotFound if `name` is not loaded."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AdapterNotFound(name)
            lease = Lease(name, entry.internal, entry.info.version)
            self._leases[lease.internal] += 1
        return lease

    def release(self, lease: Lease) -> bool:
        """Give a lease back; True when that left retired weights to delete with collect()."""
        with self._lock:
            self._leases[lease.internal] -= 1
            if self._leases[lease.internal] > 0:
                return False
            del self._leases[lease.internal]
            if lease.internal not in self._retired:
                return False
            self._doomed.append(lease.internal)
            return True

    def peft_name_of(self, lease: Lease) -> str | None:
        """The PEFT adapter name a row under `lease` passes (None while merged, as peft_name)."""
        with self._lock:
            installed = (
                self._entries.get(lease.name, None) is not None
                and self._entries[lease.name].internal == lease.internal
            ) or lease.internal in self._retired
        if not installed:  # only if the lease was returned before its row ran
            raise AdapterNotFound(lease.name)
        return None if lease.internal == self._peft.merged else lease.internal

    # ---- model thread -------------------------------------------------------------------

    def collect(self) -> None:
        """Delete retired versions whose last lease is gone (model thread)."""
        with self._lock:
            doomed = [i for i in self._doomed if i in self._retired and not self._leases[i]]
            self._doomed.clear()
            for internal in doomed:
                del self._retired[internal]
        if not doomed:
            return
        self._unmerge()
        for internal in doomed:
            self._peft.delete(internal)
            log.info("deleted retired adapter weights %s (no request uses them now)", internal)
        self._changed()

    def begin_batch(self, names: Sequence[str | None], running: Sequence[str | None] = ()) -> None:
        """Called by the engine before it resolves a batch's rows (public names, None = base):
        deletes unleased retired versions, counts usage, then merges or unmerges as the merge
        policy says. `running`: the rows of a step batch already decoding, which the merge
        policy must serve too (their usage was counted when they joined)."""
        self.collect()
        now = datetime.now(UTC)
        with self._lock:
            tick = next(self._ticks)
            for name in names:
                entry = self._entries.get(name) if name is not None else None
                if entry is not None:
                    entry.served += 1
                    entry.last_used = now
                    entry.tick = tick
            alone = len(self._entries) == 1 and not self._retired
            only = next(iter(self._entries.values())) if alone else None
        if not self.policy.merge_single:
            return
        try:
            everyone = [*names, *running]
            if only is not None and everyone and all(n == only.info.name for n in everyone):
                self._merge(only.internal)
            else:
                self._unmerge()
        except Exception:  # the batch still runs, unmerged (per-row adapters are always right)
            log.exception("merge policy failed; serving unmerged")

    def install(
        self, name: str, prepared: PreparedAdapter, *, pinned: bool = False
    ) -> tuple[AdapterInfo, bool]:
        """Install prepared as name; returns (info, whether it replaced an adapter).

        Over the memory budget, evicts least recently used idle adapters after the install
        succeeds; raises AdapterBudgetExceeded (evicting nothing) when they cannot make room."""
        check_name(name)
        self.collect()
        need = self.resident_bytes(prepared)
        with self._lock:
            residents = [
                Resident(
                    n,
                    e.info.resident_bytes,
                    e.tick,
                    e.pinned,
                    self._held[n] > 0 or self._leases[e.internal] > 0,
                )
                for n, e in self._entries.items()
            ]
        evict = plan_eviction(residents, name, need, self.policy.memory_budget)
        self._unmerge()
        internal = f"lorag{next(self._ids)}"
        self._peft.inject(internal, prepared)
        info = AdapterInfo(
            name=name,
            path=prepared.rel,
            bytes=prepared.bytes,
            loaded_at=datetime.now(UTC),
            version=prepared.version,
            resident_bytes=need,
            **describe(prepared.config),
        )
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = _Entry(info, internal, pinned, next(self._ticks))
            gone = [self._entries.pop(n) for n in evict]
            self.evictions += len(gone)
            replaced = old is not None
            if old is not None and self._leases[old.internal] > 0:
                self._retired[old.internal] = old  # admitted requests finish on it
                old = None
        if old is not None:
            self._peft.delete(old.internal)
        for entry in gone:
            self._peft.delete(entry.internal)
            log.info(
                "evicted adapter %r (%d bytes, last used %s) to fit %r under the %d-byte budget",
                entry.info.name,
                entry.info.resident_bytes,
                entry.last_used,
                name,
                self.policy.memory_budget,
            )
        self._changed()
        log.info(
            "%s adapter %r (%s, r=%d, version %s) as %s",
            "replaced" if replaced else "installed",
            name,
            info.path,
            info.rank,
            info.version,
            internal,
        )
        return self.get(name), replaced

    def ensure(self, name: str, prepared: PreparedAdapter) -> AdapterInfo:
        """Install prepared as name unless name is loaded by now (a lazy load that raced a PUT
        or another lazy load keeps what is there)."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is not None:
            return entry.snapshot()
        return self.install(name, prepared)[0]

    def unload(self, name: str) -> None:
        """Remove the adapter and free its weights; the base serves alone after the last."""
        self.collect()
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                raise AdapterNotFound(name)
            leased = self._leases[entry.internal] > 0
            if leased:
                self._retired[entry.internal] = entry  # admitted requests finish on it
        if leased:
            log.info(
                "unloaded adapter %r; %s stays until its requests finish", name, entry.internal
            )
            return
        self._unmerge()
        self._peft.delete(entry.internal)
        self._changed()
        log.info("unloaded adapter %r (%s)", name, entry.internal)

    def resident_bytes(self, prepared: PreparedAdapter) -> int:
        """Bytes prepared's LoRA weights take once installed (in the model's dtype)."""
        return sum(t.numel() for t in prepared.state_dict.values()) * self._peft.element_size

    def _merge(self, internal: str) -> None:
        if self._peft.merged == internal:
            return
        self._unmerge()
        self._peft.merge(internal)
        self._changed()

    def _unmerge(self) -> None:
        if self._peft.unmerge():
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._peft.model)
