"""The request engine: an async queue in front of one model thread.

Every touch of the generator's weights runs on a single thread: batched generation and
adapter installs/unloads alike. That is a deliberate trade: PEFT's per-row
`adapter_names` works by registering forward hooks for the duration of one call, and
installing or deleting an adapter rewrites the module tree, so two threads in the model
at once would see each other's state. One thread also matches the hardware: a CPU (or
one GPU stream) runs one batch at a time anyway, so concurrency comes from batching
requests together, not from threads.

Requests wait at most `batch_wait_ms` for company, up to `max_batch_size` rows; a batch
may mix adapters and the base, since the backend gives each row its own adapter.

Admission-aware waiting: the service announces a request (`expect()`) when it starts
retrieving its passages, before the row can be queued. While announced rows are on their way,
a forming batch waits for them, up to `expect_wait_ms`, instead of leaving with the first few
arrivals. Without it, closed-loop clients that get their answers together come back spread
over their retrieval times and the batches alternate small and large (a convoy: bench/RESULTS.md,
"Server batching"); a lone request is never held, since nothing else is announced.
Adapter operations queue in the same order as requests, so a request admitted before a
swap runs before it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from app.errors import GenerationTimeout, LoragError, NotReadyError
from app.generation.decoding import Answer
from app.generation.types import Decoding, GenRow, Mode
from app.lora.registry import Lease
from app.retrieval.types import Passage

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchDecoder(Protocol):
    """Answers rows in their own modes, each with its own adapter (app.generation.decoding)."""

    def run(self, rows: Sequence[GenRow]) -> list[Answer]: ...


class AdapterResolver(Protocol):
    def begin_batch(self, names: Sequence[str | None]) -> None: ...
    def peft_name_of(self, lease: Lease) -> str | None: ...


@dataclass(frozen=True, slots=True)
class EngineResult:
    answer: Answer
    adapter_version: str | None  # the weights the row actually ran with


_Outcome = EngineResult | BaseException


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One row to generate. `adapter` is the public adapter name (usage counts, the merge
    policy); the row runs on the version its `lease` names, taken when the request was
    admitted (AdapterRegistry.acquire), so an adapter comes with its lease."""

    question: str
    passages: Sequence[Passage]
    adapter: str | None
    max_new_tokens: int
    mode: Mode = "concat"
    decoding: Decoding = "thorough"
    scores: Sequence[float] = ()
    lease: Lease | None = None

    def __post_init__(self) -> None:
        if (self.adapter is None) != (self.lease is None):
            raise ValueError(f"adapter {self.adapter!r} and its lease go together")


@dataclass
class _GenItem:
    request: EngineRequest
    future: asyncio.Future[EngineResult]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _OpItem:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


class Expected:
    """One announced row: withdrawn when it is queued or when its request fails first."""

    def __init__(self, engine: Engine) -> None:
        self._engine: Engine | None = engine
        engine._announce(+1)

    def withdraw(self) -> None:
        if self._engine is not None:
            self._engine._announce(-1)
            self._engine = None

    def __enter__(self) -> Expected:
        return self

    def __exit__(self, *exc: object) -> None:
        self.withdraw()


@dataclass
class EngineStats:
    """Counters the metrics layer reads; written on the event loop only."""

    batches: int = 0
    rows: int = 0
    last_batch_size: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))


class Engine:
    def __init__(
        self,
        decoder: BatchDecoder,
        adapters: AdapterResolver,
        *,
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        expect_wait_ms: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._decoder = decoder
        self._adapters = adapters
        self._max_batch = max_batch_size
        self._wait_s = batch_wait_ms / 1000.0
        self._expect_wait_s = expect_wait_ms / 1000.0
        self._expected = 0  # announced rows not queued yet (event loop only)
        self._expected_changed = asyncio.Event()
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_GenItem | _OpItem | None] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lorag-model"
        )
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self.stats = EngineStats()

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="lorag-engine")

    async def stop(self) -> None:
        """Stop admitting, finish what was admitted, then stop the model thread."""
        self._accepting = False
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def expected(self) -> int:
        """Rows announced with expect() and not queued yet."""
        return self._expected

    def expect(self) -> Expected:
        """Announce a row that will be generated soon; pass it to generate(), or use it as a
        context manager so that a request failing before then withdraws it."""
        return Expected(self)

    def _announce(self, delta: int) -> None:
        self._expected += delta
        self._expected_changed.set()

    # public calls --------------------------------------------------------------------------

    async def generate(
        self,
        request: EngineRequest,
        *,
        timeout_s: float | None = None,
        expected: Expected | None = None,
    ) -> EngineResult:
        """Queue one row and wait for its answer. Cancelling the caller drops the row."""
        if expected is not None:
            expected.withdraw()  # queued now (or refused): a forming batch stops waiting for it
        if not self._accepting:
            raise NotReadyError("the engine is not accepting requests (starting or stopping)")
        future: asyncio.Future[EngineResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_GenItem(request, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            future.cancel()  # a queued row is skipped; a running one finishes unobserved
            raise GenerationTimeout(f"generation took longer than {timeout_s} s") from None
        except asyncio.CancelledError:
            future.cancel()
            raise

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model thread, between batches, in queue order."""
        if not self._accepting:
            raise NotReadyError("the engine is not accepting requests (starting or stopping)")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_OpItem(fn, future))
        return await future

    # the dispatcher ---------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        pending: _GenItem | _OpItem | None = None
        while True:
            item = pending if pending is not None else await self._queue.get()
            pending = None
            if item is None:
                return
            if isinstance(item, _OpItem):
                await self._run_op(loop, item)
                continue
            batch = [item]
            started = loop.time()
            while len(batch) < self._max_batch:
                nxt = await self._next_for_batch(loop, started)
                if nxt is None:
                    break
                if not isinstance(nxt, _GenItem):
                    pending = nxt  # an adapter op or the stop marker waits for this batch
                    break
                batch.append(nxt)
            await self._run_batch(loop, batch)

    async def _next_for_batch(
        self, loop: asyncio.AbstractEventLoop, started: float
    ) -> _GenItem | _OpItem | None:
        """The next queued item for a forming batch, or None when the batch should leave: after
        batch_wait_ms, or while announced rows are still coming, after expect_wait_ms."""
        while True:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            limit = self._wait_s
            if self._expected > 0:
                limit = max(limit, self._expect_wait_s)
            remaining = started + limit - loop.time()
            if remaining <= 0:
                return None
            # wake on a new item, or when the count of announced rows changes (one failed, or
            # all arrived: then the shorter limit applies again)
            self._expected_changed.clear()
            getter = asyncio.ensure_future(self._queue.get())
            changed = asyncio.ensure_future(self._expected_changed.wait())
            done, _ = await asyncio.wait(
                {getter, changed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            changed.cancel()
            if getter in done:
                return getter.result()
            getter.cancel()
            try:
                await getter  # the get may have taken an item while being cancelled
            except asyncio.CancelledError:
                pass
            else:
                return getter.result()

    async def _run_op(self, loop: asyncio.AbstractEventLoop, item: _OpItem) -> None:
        try:
            result = await loop.run_in_executor(self._executor, item.fn)
        except Exception as exc:  # handed to the caller, who maps it
            if not item.future.done():
                item.future.set_exception(exc)
        else:
            if not item.future.done():
                item.future.set_result(result)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_GenItem]) -> None:
        live = [it for it in batch if not it.future.done()]  # cancelled or timed out: skip
        if not live:
            return
        started = time.perf_counter()
        outcome = await loop.run_in_executor(self._executor, self._generate_on_model_thread, live)
        for it, result in zip(live, outcome, strict=True):
            if it.future.done():
                continue
            if isinstance(result, BaseException):
                it.future.set_exception(result)
            else:
                it.future.set_result(result)
        self.stats.batches += 1
        self.stats.rows += len(live)
        self.stats.last_batch_size = len(live)
        self.stats.batch_sizes.append(len(live))
        if self._on_batch is not None:
            self._on_batch(len(live), time.perf_counter() - started)

    def _generate_on_model_thread(self, items: list[_GenItem]) -> list[_Outcome]:
        """Resolve adapters now (the registry may have changed while rows waited), then generate."""
        results: list[_Outcome] = [RuntimeError("not run")] * len(items)
        versions: list[str | None] = [None] * len(items)
        rows: list[GenRow] = []
        index: list[int] = []
        self._adapters.begin_batch([it.request.adapter for it in items])  # usage, merge policy
        for i, it in enumerate(items):
            req = it.request
            # adapters change only on this thread, so name and version are read consistently
            try:
                peft = None
                if req.lease is not None:
                    peft = self._adapters.peft_name_of(req.lease)
                    versions[i] = req.lease.version
            except LoragError as exc:
                results[i] = exc
                continue
            rows.append(
                GenRow(
                    req.question,
                    req.passages,
                    peft,
                    req.max_new_tokens,
                    req.mode,
                    req.decoding,
                    req.scores,
                )
            )
            index.append(i)
        if rows:
            try:
                answers = self._decoder.run(rows)
            except Exception as exc:
                log.exception("generation failed for a batch of %d rows", len(rows))
                for i in index:
                    results[i] = exc
            else:
                for i, answer in zip(index, answers, strict=True):
                    results[i] = EngineResult(answer, versions[i])
        return results
