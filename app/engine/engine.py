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

Step-level scheduling (with a `StepBatch`, app/generation/stepping.py): requests, in every
decoding mode, greedy or with beams, do not run to the end of their batch. The first rows form
a batch as above and start a session on the model thread; from then on, requests that arrive
join the running batch at the next decoding step boundary (prefilled together, up to
LORAG_PREFILL_TOKENS_PER_STEP prompt tokens while rows decode) while its rows number at most
`max_batch_size` (a RAG-Token or RAG-Sequence request takes one row per passage and beam),
and each request leaves the step its answer ends, its future answered at once. Adapter
operations, and requests a step batch was built not to take, run whole at a step boundary, in
queue order, while the running rows wait. The session ends when nothing runs and nothing
waits. Without a StepBatch (`LORAG_STEP_BATCHING=false`, or a model it cannot pad exactly)
every batch runs whole, as described first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from app.contracts import Decoding, GenRow, Mode, Passage
from app.errors import GenerationTimeout, LoragError, NotReadyError
from app.generation.decoding import Answer
from app.generation.stepping import StepBatch
from app.lora.registry import Lease

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchDecoder(Protocol):
    """Answers rows in their own modes, each with its own adapter (app.generation.decoding)."""

    def run(self, rows: Sequence[GenRow]) -> list[Answer]: ...


class AdapterResolver(Protocol):
    def begin_batch(
        self, names: Sequence[str | None], running: Sequence[str | None] = ()
    ) -> None: ...
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
    # called on the event loop with the answer's text so far, as it grows, while the request
    # decodes in the step batch (concat, greedy RAG-Token); never for rows run whole
    on_text: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if (self.adapter is None) != (self.lease is None):
            raise ValueError(f"adapter {self.adapter!r} and its lease go together")


@dataclass
class _GenItem:
    request: EngineRequest
    future: asyncio.Future[EngineResult]
    enqueued: float = field(default_factory=time.perf_counter)
    streamed: str = ""  # the text last handed to request.on_text


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

    batches: int = 0  # model calls that admitted rows: whole batches, or prefills of joiners
    rows: int = 0
    last_batch_size: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))
    steps: int = 0  # decoding steps of the step batch
    joined_running: int = 0  # rows that joined a batch already decoding


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
        stepper: StepBatch | None = None,
        prefill_tokens_per_step: int = 0,
        on_first_token: Callable[[float], None] | None = None,
        on_token_gap: Callable[[float], None] | None = None,
    ) -> None:
        self._decoder = decoder
        self._stepper = stepper
        self._prefill_budget = prefill_tokens_per_step  # 0: no limit
        # step batch latencies (event loop): a request's wait for its first token; the time
        # between two tokens of the running answers (two decoding steps, and any joins between)
        self._on_first_token = on_first_token
        self._on_token_gap = on_token_gap
        self._last_step: float | None = None  # model thread
        # step-level sessions: items handed to a running session, and whether one runs
        self._lock = threading.Lock()
        self._inbox: deque[_GenItem | _OpItem] = deque()
        self._session_open = False
        self._session: asyncio.Future[None] | None = None
        self._backlog = 0  # items a session has taken but not admitted yet (model thread)
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
        """Items not running yet: queued, or handed to a running session and not admitted."""
        return self._queue.qsize() + len(self._inbox) + self._backlog

    @property
    def running(self) -> int:
        """Requests decoding in the step batch now."""
        return len(self._stepper) if self._stepper is not None else 0

    @property
    def running_rows(self) -> int:
        """Batch rows decoding in the step batch now (a RAG request has one per passage and
        beam); at most max_batch_size, unless one request alone has more."""
        return self._stepper.width if self._stepper is not None else 0

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
                if self._session is not None:
                    await self._session  # it answers everything handed to it, then ends
                return
            if self._hand_to_session(item):
                continue
            if self._session is not None:
                await self._session  # it has decided to end: let it finish
                self._session = None
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
            if self._stepper is not None:
                self._open_session(loop, batch)
            else:
                await self._run_batch(loop, batch)

    def _hand_to_session(self, item: _GenItem | _OpItem) -> bool:
        """Give item to the running session (it takes it at its next step boundary); False
        when no session runs, or the one running has decided to end."""
        with self._lock:
            if not self._session_open:
                return False
            self._inbox.append(item)
            return True

    def _open_session(self, loop: asyncio.AbstractEventLoop, batch: list[_GenItem]) -> None:
        with self._lock:
            self._session_open = True
            self._inbox.extend(batch)
        self._session = asyncio.ensure_future(
            loop.run_in_executor(self._executor, self._session_loop, loop)
        )

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
        self._count_batch(len(live), time.perf_counter() - started)

    # the step-level session (model thread) --------------------------------------------------

    def _session_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the step batch until nothing runs and nothing waits (model thread).

        At each step boundary: take what was handed over; admit it in queue order (the requests
        the step batch takes join it while it has room; others run whole; an adapter operation runs
        after the rows before it are admitted); drop rows whose clients left; decode one step
        and answer the rows that finished.
        """
        stepper = self._stepper
        assert stepper is not None
        self._last_step = None
        backlog: deque[_GenItem | _OpItem] = deque()
        running: dict[int, tuple[_GenItem, str | None]] = {}  # id(item) -> (item, version)
        try:
            while True:
                with self._lock:
                    backlog.extend(self._inbox)
                    self._inbox.clear()
                    if not backlog and not running:
                        self._session_open = False
                        self._backlog = 0
                        return
                self._backlog = len(backlog)
                self._admit(loop, stepper, backlog, running)
                self._backlog = len(backlog)
                gone = {k for k, (it, _) in running.items() if it.future.done()}
                if gone:  # timed out or cancelled: the row leaves the batch
                    stepper.drop(gone)
                    for k in gone:
                        del running[k]
                if running:
                    self._step(loop, stepper, running)
        except BaseException as exc:  # never leave a future unanswered
            log.exception("the step-level session failed")
            for it, _ in running.values():
                self._settle(loop, it, exc)
            stepper.clear()
            with self._lock:
                for item in [*backlog, *self._inbox]:
                    self._settle(loop, item, exc)
                self._inbox.clear()
                self._session_open = False
                self._backlog = 0

    def _admit(
        self,
        loop: asyncio.AbstractEventLoop,
        stepper: StepBatch,
        backlog: deque[_GenItem | _OpItem],
        running: dict[int, tuple[_GenItem, str | None]],
    ) -> None:
        """Admit items from the front of backlog while the step batch has room."""
        while backlog:
            joiners: list[_GenItem] = []
            whole: list[_GenItem] = []
            width = stepper.width  # batch rows, running and joining
            tokens = 0  # prompt tokens of the joiners, against the budget while rows decode
            budget = self._prefill_budget if running else 0
            while backlog and isinstance(backlog[0], _GenItem):
                item = backlog[0]
                if item.future.done():  # cancelled while it waited
                    backlog.popleft()
                    continue
                req = item.request
                if stepper.takes_mode(req.mode):
                    need = stepper.rows_for(req.mode, len(req.passages))
                    if width + need > self._max_batch and (running or joiners):
                        break  # full: it waits for rows to leave, and so does what follows
                    if budget:
                        cost = stepper.prompt_tokens(
                            req.question, req.passages, req.max_new_tokens, req.mode
                        )
                        if joiners and tokens + cost > budget:
                            break  # the running rows decode a step before the next joiners
                        tokens += cost
                    joiners.append(item)
                    width += need
                elif len(whole) < self._max_batch:
                    whole.append(item)
                else:
                    break
                backlog.popleft()
            if joiners or whole:
                self._start_rows(loop, stepper, joiners, whole, running)
            if not backlog or isinstance(backlog[0], _GenItem):
                return  # the batch is full, or all is admitted
            op = backlog.popleft()
            assert isinstance(op, _OpItem)
            self._run_op_here(loop, op)
            self._rename(stepper, running)  # an install or unload may have unmerged

    def _start_rows(
        self,
        loop: asyncio.AbstractEventLoop,
        stepper: StepBatch,
        joiners: list[_GenItem],
        whole: list[_GenItem],
        running: dict[int, tuple[_GenItem, str | None]],
    ) -> None:
        """Run `whole` to the end and prefill `joiners` into the step batch."""
        self._adapters.begin_batch(
            [it.request.adapter for it in joiners + whole],
            running=[it.request.adapter for it, _ in running.values()],
        )
        self._rename(stepper, running)  # the merge policy may just have merged or unmerged
        if whole:
            started = time.perf_counter()
            outcomes = self._generate_resolved(whole)
            for it, outcome in zip(whole, outcomes, strict=True):
                self._settle(loop, it, outcome)
            self._record(loop, len(whole), time.perf_counter() - started)
        rows, keys, versions = [], [], []
        for it in joiners:
            try:
                row, version = self._resolve(it.request)
            except LoragError as exc:
                self._settle(loop, it, exc)
                continue
            rows.append(row)
            keys.append(id(it))
            versions.append(version)
        if not rows:
            return
        admitted = {id(it): it for it in joiners}
        started = time.perf_counter()
        was_running = bool(running)
        try:
            finished = stepper.join(rows, keys)
        except Exception as exc:
            log.exception("prefill failed for %d joining rows", len(rows))
            for key in keys:
                self._settle(loop, admitted[key], exc)
            return
        now = time.perf_counter()
        for key, version in zip(keys, versions, strict=True):
            running[key] = (admitted[key], version)
            if self._on_first_token is not None:
                loop.call_soon_threadsafe(self._on_first_token, now - admitted[key].enqueued)
        self._record(loop, len(rows), now - started, joined=was_running)
        self._finish(loop, finished, running)
        self._stream(loop, stepper, running)

    def _step(
        self,
        loop: asyncio.AbstractEventLoop,
        stepper: StepBatch,
        running: dict[int, tuple[_GenItem, str | None]],
    ) -> None:
        rows = len(stepper)
        try:
            finished = stepper.step()
        except Exception as exc:
            log.exception("a decoding step failed for %d rows", rows)
            for key in stepper.clear():
                item, _ = running.pop(key)  # type: ignore[call-overload]  # keys are ours
                self._settle(loop, item, exc)
            return
        loop.call_soon_threadsafe(self._count_step)
        now = time.perf_counter()
        if self._on_token_gap is not None and self._last_step is not None:
            loop.call_soon_threadsafe(self._on_token_gap, now - self._last_step)
        self._finish(loop, finished, running)
        self._last_step = now if running else None  # nobody waits for the next step
        self._stream(loop, stepper, running)

    def _finish(
        self,
        loop: asyncio.AbstractEventLoop,
        finished: list[tuple[Any, Answer]],
        running: dict[int, tuple[_GenItem, str | None]],
    ) -> None:
        for key, answer in finished:
            item, version = running.pop(key)
            self._settle(loop, item, EngineResult(answer, version))

    def _stream(
        self,
        loop: asyncio.AbstractEventLoop,
        stepper: StepBatch,
        running: dict[int, tuple[_GenItem, str | None]],
    ) -> None:
        """Hand each streaming request's text so far to its on_text (when it grew)."""
        for key, (item, _) in running.items():
            on_text = item.request.on_text
            if on_text is None or item.future.done():
                continue
            text = stepper.text_of(key)
            if text is not None and text != item.streamed:
                item.streamed = text
                loop.call_soon_threadsafe(on_text, text)

    def _rename(self, stepper: StepBatch, running: dict[int, tuple[_GenItem, str | None]]) -> None:
        """Re-read the PEFT name of every running row's version (None while merged)."""
        names: dict[Any, str | None] = {}
        for key, (item, _) in running.items():
            lease = item.request.lease
            names[key] = self._adapters.peft_name_of(lease) if lease is not None else None
        stepper.rename(names)

    def _run_op_here(self, loop: asyncio.AbstractEventLoop, op: _OpItem) -> None:
        try:
            result = op.fn()
        except Exception as exc:  # handed to the caller, who maps it
            self._settle(loop, op, exc)
        else:
            loop.call_soon_threadsafe(_set_result, op.future, result)

    def _settle(
        self, loop: asyncio.AbstractEventLoop, item: _GenItem | _OpItem, outcome: object
    ) -> None:
        loop.call_soon_threadsafe(_set_outcome, item.future, outcome)

    def _record(
        self, loop: asyncio.AbstractEventLoop, rows: int, seconds: float, *, joined: bool = False
    ) -> None:
        loop.call_soon_threadsafe(self._count_batch, rows, seconds, joined)

    def _count_batch(self, rows: int, seconds: float, joined: bool = False) -> None:
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.last_batch_size = rows
        self.stats.batch_sizes.append(rows)
        if joined:
            self.stats.joined_running += rows
        if self._on_batch is not None:
            self._on_batch(rows, seconds)

    def _count_step(self) -> None:
        self.stats.steps += 1

    def _resolve(self, req: EngineRequest) -> tuple[GenRow, str | None]:
        """The row to generate for req, under the PEFT name of its leased version (now: the
        registry may have changed while it waited). Raises LoragError."""
        peft, version = None, None
        if req.lease is not None:
            peft = self._adapters.peft_name_of(req.lease)
            version = req.lease.version
        row = GenRow(
            req.question,
            req.passages,
            peft,
            req.max_new_tokens,
            req.mode,
            req.decoding,
            req.scores,
        )
        return row, version

    # whole batches ------------------------------------------------------------------------------

    def _generate_on_model_thread(self, items: list[_GenItem]) -> list[_Outcome]:
        """Resolve adapters now (the registry may have changed while rows waited), then generate."""
        self._adapters.begin_batch([it.request.adapter for it in items])  # usage, merge policy
        return self._generate_resolved(items)

    def _generate_resolved(self, items: list[_GenItem]) -> list[_Outcome]:
        results: list[_Outcome] = [RuntimeError("not run")] * len(items)
        versions: list[str | None] = [None] * len(items)
        rows: list[GenRow] = []
        index: list[int] = []
        for i, it in enumerate(items):
            # adapters change only on this thread, so name and version are read consistently
            try:
                row, versions[i] = self._resolve(it.request)
            except LoragError as exc:
                results[i] = exc
                continue
            rows.append(row)
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


def _set_outcome(future: asyncio.Future[Any], outcome: object) -> None:
    """Answer future (event loop) unless it is done already (cancelled, timed out)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _set_result(future: asyncio.Future[Any], result: object) -> None:
    if not future.done():
        future.set_result(result)
