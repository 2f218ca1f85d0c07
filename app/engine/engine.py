"""The request engine: an async queue in front of one model thread.

Every touch of the generator's weights runs on a single thread: decoding steps and adapter
installs/unloads alike. That is a deliberate trade: PEFT's per-row `adapter_names` works by
registering forward hooks for the duration of one call, and installing or deleting an adapter
rewrites the module tree, so two threads in the model at once would see each other's state.
One thread also matches the hardware: a CPU (or one GPU stream) runs one batch at a time
anyway, so concurrency comes from batching requests together, not from threads.

The first requests wait at most `batch_wait_ms` for company, up to `max_batch_size` rows, and
start a session of the step loop on the model thread (app/engine/session.py); from then on,
requests that arrive join the running batch at the next step boundary, and each leaves the step
its answer ends. The session ends when nothing runs and nothing waits.

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
from collections.abc import Callable
from typing import TypeVar

from app.engine.config import EngineConfig
from app.engine.requests import AdapterResolver, EngineRequest, EngineResult, Observers, Stepper
from app.engine.session import EngineStats, GenItem, Inbox, Item, OpItem, Session, settle
from app.errors import GenerationTimeout, NotReadyError
from app.generation.prefix_cache import PrefixCache

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class Engine:
    def __init__(
        self,
        stepper: Stepper,
        adapters: AdapterResolver,
        config: EngineConfig | None = None,
        observers: Observers | None = None,
    ) -> None:
        self._stepper = stepper
        self._adapters = adapters
        self.config = config or EngineConfig()
        self._observers = observers or Observers()
        if self.config.step_batching and stepper.cannot_join is not None:
            log.warning("rows cannot join a running batch: %s", stepper.cannot_join)
        self._inbox = Inbox()
        self._session: asyncio.Future[None] | None = None
        self._expected = 0  # announced rows not queued yet (event loop only)
        self._expected_changed = asyncio.Event()
        self._queue: asyncio.Queue[Item | None] = asyncio.Queue()
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
        """Items not running yet: queued, or handed to a running session and not admitted."""
        return self._queue.qsize() + len(self._inbox) + self._inbox.backlog

    @property
    def running(self) -> int:
        """Requests decoding in the step batch now."""
        return len(self._stepper)

    @property
    def running_rows(self) -> int:
        """Batch rows decoding now (a RAG request has one per passage and beam); at most
        max_batch_size, unless one request alone has more."""
        return self._stepper.width

    @property
    def prefixes(self) -> PrefixCache | None:
        """The step batch's prompt-prefix cache (metrics read it), or None when off."""
        return self._stepper.prefixes

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
        """Queue one request and wait for its answer. Cancelling the caller drops it."""
        if expected is not None:
            expected.withdraw()  # queued now (or refused): a forming batch stops waiting for it
        if not self._accepting:
            raise NotReadyError("the engine is not accepting requests (starting or stopping)")
        future: asyncio.Future[EngineResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(GenItem(request, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            future.cancel()  # a queued request is skipped; a running one leaves its batch
            raise GenerationTimeout(f"generation took longer than {timeout_s} s") from None
        except asyncio.CancelledError:
            future.cancel()
            raise

    async def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model thread, between steps, in queue order."""
        if not self._accepting:
            raise NotReadyError("the engine is not accepting requests (starting or stopping)")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(OpItem(fn, future))
        return await future

    # the dispatcher ---------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        pending: Item | None = None
        while True:
            item = pending if pending is not None else await self._queue.get()
            pending = None
            if item is None:
                if self._session is not None:
                    await self._session  # it answers everything handed to it, then ends
                return
            if self._inbox.offer(item):
                continue
            if self._session is not None:
                await self._session  # it has decided to end: let it finish
                self._session = None
            if isinstance(item, OpItem):
                await self._run_op(loop, item)
                continue
            batch = [item]
            started = loop.time()
            while len(batch) < self.config.max_batch_size:
                nxt = await self._next_for_batch(loop, started)
                if nxt is None:
                    break
                if not isinstance(nxt, GenItem):
                    pending = nxt  # an adapter op or the stop marker waits for this batch
                    break
                batch.append(nxt)
            self._inbox.start(batch)
            session = Session(
                loop,
                self._stepper,
                self._adapters,
                self.config,
                self._observers,
                self.stats,
                self._inbox,
            )
            self._session = asyncio.ensure_future(loop.run_in_executor(self._executor, session.run))

    async def _next_for_batch(self, loop: asyncio.AbstractEventLoop, started: float) -> Item | None:
        """The next queued item for a forming batch, or None when the batch should leave: after
        batch_wait_ms, or while announced rows are still coming, after expect_wait_ms."""
        while True:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            limit = self.config.batch_wait_ms / 1000.0
            if self._expected > 0:
                limit = max(limit, self.config.expect_wait_ms / 1000.0)
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

    async def _run_op(self, loop: asyncio.AbstractEventLoop, item: OpItem) -> None:
        try:
            result = await loop.run_in_executor(self._executor, item.fn)
        except Exception as exc:  # handed to the caller, who maps it
            settle(item.future, exc)
        else:
            settle(item.future, result)
