"""Coalescing: calls that arrive while the worker is busy run together as its next batch.

For work that is cheaper per item in a batch and must run on one thread, such as encoding
questions (the encoder's fast tokenizer is not thread-safe, and one encoder call over 16
questions costs a fraction of 16 calls). Nothing waits for company: an idle worker starts at
once with what is there, and whatever arrives meanwhile forms the next batch, so a lone call
pays no added latency and batches grow only with load ("natural" batching, as in the model
servers that batch without a timer).

Items are grouped by key (say, the index and the top-k they need), one call per group. A group
whose batched call raises is retried item by item, so one bad item fails alone instead of
taking its neighbours with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 (an item)
O = TypeVar("O")  # noqa: E741 (its result)


@dataclass
class _Call(Generic[K, I, O]):
    key: K
    item: I
    future: asyncio.Future[O]


class Coalescer(Generic[K, I, O]):
    def __init__(
        self,
        fn: Callable[[K, Sequence[I]], Sequence[O]],
        executor: concurrent.futures.Executor,
        *,
        max_batch: int = 64,
    ) -> None:
        """fn(key, items) returns one result per item, in order; it runs on `executor`."""
        self._fn = fn
        self._executor = executor
        self._max_batch = max_batch
        self._waiting: list[_Call[K, I, O]] = []
        self._worker: asyncio.Task[None] | None = None
        self.batches: list[int] = []  # sizes of recent batches, for tests and benchmarks

    async def submit(self, key: K, item: I) -> O:
        future: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Call(key, item, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="lorag-coalesce")
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            calls = [c for c in self._waiting[: self._max_batch] if not c.future.done()]
            del self._waiting[: self._max_batch]
            if not calls:
                continue
            self.batches = [*self.batches[-255:], len(calls)]
            groups: dict[K, list[_Call[K, I, O]]] = defaultdict(list)
            for call in calls:
                groups[call.key].append(call)
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, self._run, list(groups.items())
                )
            except BaseException as exc:  # the executor is shut down, or this task cancelled
                for call in calls:
                    if not call.future.done():
                        call.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue  # the callers have their error; the rest of the queue gets its own
            for call, outcome in zip(
                [c for _, group in groups.items() for c in group], outcomes, strict=True
            ):
                if call.future.done():  # the caller gave up
                    continue
                if isinstance(outcome, BaseException):
                    call.future.set_exception(outcome)
                else:
                    call.future.set_result(outcome)

    def _run(self, groups: list[tuple[K, list[_Call[K, I, O]]]]) -> list[O | BaseException]:
        """On the executor: one call per group; a failed group is retried item by item."""
        out: list[O | BaseException] = []
        for key, group in groups:
            items = [c.item for c in group]
            try:
                results = list(self._fn(key, items))
                if len(results) != len(items):
                    raise RuntimeError(f"{len(results)} results for {len(items)} items")
                out.extend(results)
                continue
            except Exception as exc:
                if len(items) == 1:
                    out.append(exc)
                    continue
                log.debug("a batch of %d failed (%s); retrying one by one", len(items), exc)
            for item in items:
                try:
                    out.extend(self._fn(key, [item]))
                except Exception as exc:
                    out.append(exc)
        return out
