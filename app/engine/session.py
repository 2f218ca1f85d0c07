"""The step loop on the model thread: admit requests into the step batch at step boundaries,
decode a step, answer the requests that finished, until nothing runs and nothing waits.

At each step boundary: take what the dispatcher handed over (the inbox); admit it in queue
order (requests join the batch while it has room, up to max_batch_size rows, and up to
prefill_tokens_per_step prompt tokens to compute while rows decode, what the prefix cache
holds not counted; an adapter operation runs after the requests before it are admitted);
prefill the admitted joiners, those the prefix cache holds first, in a call of their own
(`cheap_first`); drop requests whose clients left; decode one step. Without
joins (LORAG_STEP_BATCHING=false, or a model the step batch cannot pad per row) requests are
admitted only into an empty batch: every batch starts whole and shrinks as its rows end.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from app.engine.config import EngineConfig
from app.engine.requests import AdapterResolver, EngineRequest, EngineResult, Observers, Stepper
from app.errors import LoragError
from app.generation.modes.base import Answer
from app.generation.step_batch import CALL_COST_TOKENS

log = logging.getLogger(__name__)


@dataclass
class GenItem:
    request: EngineRequest
    future: asyncio.Future[EngineResult]
    enqueued: float = field(default_factory=time.perf_counter)
    streamed: str = ""  # the text last handed to request.on_text


@dataclass
class OpItem:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


Item = GenItem | OpItem


class Inbox:
    """Items handed from the event loop to a running session (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: deque[Item] = deque()
        self.open = False  # a session runs and takes items
        self.backlog = 0  # items a session has taken but not admitted yet

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: Item) -> bool:
        """Hand item to the running session; False when none runs or it has decided to end."""
        with self._lock:
            if self.open:
                self._items.append(item)
            return self.open

    def start(self, items: list[GenItem]) -> None:
        with self._lock:
            self.open = True
            self._items.extend(items)

    def take(self, backlog: deque[Item], idle: bool) -> bool:
        """Move the handed items to backlog; False (and closed) when nothing is left to do."""
        with self._lock:
            backlog.extend(self._items)
            self._items.clear()
            if idle and not backlog:
                self.open = False
                self.backlog = 0
                return False
            return True

    def fail(self, backlog: deque[Item], settle: Callable[[Item], None]) -> None:
        with self._lock:
            for item in [*backlog, *self._items]:
                settle(item)
            self._items.clear()
            self.open = False
            self.backlog = 0


@dataclass
class EngineStats:
    """Counters the metrics layer reads; written on the event loop only."""

    batches: int = 0  # prefills that admitted rows
    rows: int = 0
    last_batch_size: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))
    steps: int = 0  # decoding steps of the step batch
    joined_running: int = 0  # rows that joined a batch already decoding


Running = dict[Hashable, tuple[GenItem, str | None]]  # id(item) -> (item, adapter version)


class Session:
    """One run of the step loop (model thread), from its first batch until it is idle."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stepper: Stepper,
        adapters: AdapterResolver,
        config: EngineConfig,
        observers: Observers,
        stats: EngineStats,
        inbox: Inbox,
    ) -> None:
        self.loop = loop
        self.stepper = stepper
        self.adapters = adapters
        self.config = config
        self.observers = observers
        self.stats = stats
        self.inbox = inbox
        self.joins = config.step_batching and stepper.cannot_join is None
        self.running: Running = {}
        self._last_step: float | None = None

    def run(self) -> None:
        backlog: deque[Item] = deque()
        try:
            while self.inbox.take(backlog, idle=not self.running):
                self.inbox.backlog = len(backlog)
                self._admit(backlog)
                self.inbox.backlog = len(backlog)
                gone = {k for k, (it, _) in self.running.items() if it.future.done()}
                if gone:  # timed out or cancelled: the request leaves the batch
                    self.stepper.drop(gone)
                    for k in gone:
                        del self.running[k]
                if self.running:
                    self._step()
        except BaseException as exc:  # never leave a future unanswered
            log.exception("the step-level session failed")
            self._fail(backlog, exc)

    def _fail(self, backlog: deque[Item], exc: BaseException) -> None:
        for it, _ in self.running.values():
            self._settle(it, exc)
        self.stepper.clear()
        self.inbox.fail(backlog, lambda item: self._settle(item, exc))

    def _admit(self, backlog: deque[Item]) -> None:
        """Admit items from the front of backlog while the step batch has room."""
        while backlog:
            if self.running and not self.joins:
                return  # a whole batch: the next one starts when it has ended
            joiners: list[GenItem] = []
            costs: list[int] = []  # each joiner's prompt tokens to compute, where counted
            width = self.stepper.width  # batch rows, running and joining
            tokens = 0  # prompt tokens of the joiners, against the budget while rows decode
            budget = self.config.prefill_tokens_per_step if self.running else 0
            priced = bool(budget) or self.stepper.prefixes is not None
            while backlog and isinstance(backlog[0], GenItem):
                item = backlog[0]
                if item.future.done():  # cancelled while it waited
                    backlog.popleft()
                    continue
                req = item.request
                need = self.stepper.rows_for(req.mode, len(req.passages))
                if width + need > self.config.max_batch_size and (self.running or joiners):
                    break  # full: it waits for rows to leave, and so does what follows
                if priced:  # what its prefill computes: less what the prefix cache holds
                    cost = self.stepper.prompt_tokens(req.row(self._name_now(req)))
                    if budget and joiners and tokens + cost > budget:
                        break  # the running rows decode a step before the next joiners
                    tokens += cost
                    costs.append(cost)
                joiners.append(item)
                width += need
                backlog.popleft()
            for group in cheap_first(joiners, costs):
                self._start(group)
            if not backlog or isinstance(backlog[0], GenItem):
                return  # the batch is full, or all is admitted
            op = backlog.popleft()
            assert isinstance(op, OpItem)
            self._run_op(op)
            self._rename()  # an install or unload may have unmerged

    def _start(self, joiners: list[GenItem]) -> None:
        """Prefill joiners into the step batch."""
        self.adapters.begin_batch(
            [it.request.adapter for it in joiners],
            running=[it.request.adapter for it, _ in self.running.values()],
        )
        self._rename()  # the merge policy may just have merged or unmerged
        rows, keys, versions = [], [], []
        for it in joiners:
            try:  # the registry may have changed while it waited: resolve the lease now
                name = self._peft_name(it.request)
            except LoragError as exc:
                self._settle(it, exc)
                continue
            rows.append(it.request.row(name))
            keys.append(id(it))
            lease = it.request.lease
            versions.append(lease.version if lease is not None else None)
        if not rows:
            return
        admitted = {id(it): it for it in joiners}
        started = time.perf_counter()
        was_running = bool(self.running)
        try:
            finished = self.stepper.join(rows, keys)
        except Exception as exc:
            log.exception("prefill failed for %d joining rows", len(rows))
            for key in keys:
                self._settle(admitted[key], exc)
            return
        now = time.perf_counter()
        for key, version in zip(keys, versions, strict=True):
            self.running[key] = (admitted[key], version)
            if self.observers.on_first_token is not None:
                waited = now - admitted[key].enqueued
                self.loop.call_soon_threadsafe(self.observers.on_first_token, waited)
        self.loop.call_soon_threadsafe(self._count_batch, len(rows), now - started, was_running)
        self._finish(finished)
        self._stream()

    def _peft_name(self, req: EngineRequest) -> str | None:
        """The model's name for the adapter version the request leased (None: the base, or
        merged); AdapterNotFound if its lease was returned before its row ran."""
        return self.adapters.peft_name_of(req.lease) if req.lease is not None else None

    def _name_now(self, req: EngineRequest) -> str | None:
        """As _peft_name, for an estimate: None where the lease no longer resolves (_start
        answers that request with the error)."""
        try:
            return self._peft_name(req)
        except LoragError:
            return None

    def _step(self) -> None:
        rows = len(self.stepper)
        try:
            finished = self.stepper.step()
        except Exception as exc:
            log.exception("a decoding step failed for %d rows", rows)
            for key in self.stepper.clear():
                item, _ = self.running.pop(key)
                self._settle(item, exc)
            return
        self.loop.call_soon_threadsafe(self._count_step)
        now = time.perf_counter()
        on_gap = self.observers.on_token_gap
        if on_gap is not None and self._last_step is not None:
            self.loop.call_soon_threadsafe(on_gap, now - self._last_step)
        self._finish(finished)
        self._last_step = now if self.running else None  # nobody waits for the next step
        self._stream()

    def _finish(self, finished: list[tuple[Hashable, Answer]]) -> None:
        for key, answer in finished:
            item, version = self.running.pop(key)
            self._settle(item, EngineResult(answer, version))

    def _stream(self) -> None:
        """Hand each streaming request's text so far to its on_text (when it grew)."""
        for key, (item, _) in self.running.items():
            on_text = item.request.on_text
            if on_text is None or item.future.done():
                continue
            text = self.stepper.text_of(key)
            if text is not None and text != item.streamed:
                item.streamed = text
                self.loop.call_soon_threadsafe(on_text, text)

    def _rename(self) -> None:
        """Re-read the model's name for every running request's version (None while merged)."""
        names: dict[Hashable, str | None] = {}
        for key, (item, _) in self.running.items():
            lease = item.request.lease
            names[key] = self.adapters.peft_name_of(lease) if lease is not None else None
        self.stepper.rename(names)

    def _run_op(self, op: OpItem) -> None:
        try:
            result = op.fn()
        except Exception as exc:  # handed to the caller, who maps it
            self._settle(op, exc)
        else:
            self._settle(op, result)

    def _settle(self, item: Item, outcome: object) -> None:
        self.loop.call_soon_threadsafe(settle, item.future, outcome)

    def _count_batch(self, rows: int, seconds: float, joined: bool) -> None:
        count_batch(self.stats, self.observers, rows, seconds, joined=joined)

    def _count_step(self) -> None:
        self.stats.steps += 1


def cheap_first(joiners: list[GenItem], costs: list[int]) -> list[list[GenItem]]:
    """The joiners of one step boundary in the prefill calls to make, in order: those with
    fewer than CALL_COST_TOKENS prompt tokens to compute (a prefix-cache hit: about a
    decoding step's cost) first, then the others. Each call's joiners get their first token
    when it returns, so a hit does not wait for a cold prompt's prefill admitted beside it;
    the cold ones wait for one small call. Without costs (no budget, no cache), one call."""
    if not costs:
        return [joiners] if joiners else []
    cheap = [j for j, c in zip(joiners, costs, strict=True) if c < CALL_COST_TOKENS]
    rest = [j for j, c in zip(joiners, costs, strict=True) if c >= CALL_COST_TOKENS]
    return [g for g in (cheap, rest) if g]


def count_batch(
    stats: EngineStats, observers: Observers, rows: int, seconds: float, *, joined: bool
) -> None:
    stats.batches += 1
    stats.rows += rows
    stats.last_batch_size = rows
    stats.batch_sizes.append(rows)
    if joined:
        stats.joined_running += rows
    if observers.on_batch is not None:
        observers.on_batch(rows, seconds)


def settle(future: asyncio.Future[Any], outcome: object) -> None:
    """Answer future (event loop) unless it is done already (cancelled, timed out)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
