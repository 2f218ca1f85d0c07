"""Scheduling: the engine's admission-aware batch forming and the retrieval coalescer.

The step batch here echoes each row's question at its prefill (what is generated is checked
elsewhere, against PEFT and transformers); these tests are about which rows run together, and
when.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Hashable, Sequence

import pytest

from app.contracts import GenRow
from app.engine.coalesce import Coalescer
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.requests import EngineRequest
from app.errors import InvalidInputError
from app.generation.modes.base import Answer


class EchoDecoder:
    """A step batch whose requests all end at their prefill, answering their question."""

    cannot_join = None
    width = 0
    prefixes = None  # no prefix cache: joiners are not priced without a prefill budget

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __len__(self) -> int:
        return 0

    def rows_for(self, mode: str, passages: int) -> int:
        return 1

    def join(self, rows: Sequence[GenRow], keys: Sequence[Hashable]) -> list:
        self.batches.append([r.question for r in rows])
        return [(k, Answer(r.question.upper(), None, 1)) for k, r in zip(keys, rows, strict=True)]

    def rename(self, adapters: dict) -> None:
        assert not adapters  # nothing is ever left running

    def step(self) -> list:
        raise AssertionError("nothing is ever left running")

    drop = clear = text_of = step


class NoAdapters:
    def begin_batch(self, names: Sequence[str | None], running: Sequence[str | None] = ()) -> None:
        pass

    def peft_name(self, name: str) -> str | None:
        raise AssertionError("no adapters in these tests")

    def peft_name_of(self, lease: object) -> str | None:
        raise AssertionError("no adapters in these tests")

    def get(self, name: str) -> object:
        raise AssertionError("no adapters in these tests")


def request(q: str) -> EngineRequest:
    return EngineRequest(question=q, passages=[], adapter=None, max_new_tokens=4)


async def staggered(engine: Engine, n: int, gap_s: float, *, announce: bool) -> list[str]:
    """n requests announced together (as the service does when retrieval starts), whose rows
    reach the engine gap_s apart (as their retrievals finish one after another)."""

    async def one(i: int) -> str:
        expected = engine.expect() if announce else None
        await asyncio.sleep(i * gap_s)
        result = await engine.generate(request(f"q{i}"), expected=expected)
        return result.answer.text

    return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize("announce", [True, False])
def test_a_batch_waits_for_announced_rows(announce: bool) -> None:
    decoder = EchoDecoder()

    async def run() -> list[str]:
        config = EngineConfig(max_batch_size=8, batch_wait_ms=1, expect_wait_ms=2000)
        engine = Engine(decoder, NoAdapters(), config)
        engine.start()
        try:
            return await staggered(engine, 4, 0.05, announce=announce)
        finally:
            await engine.stop()

    answers = asyncio.run(run())
    assert answers == ["Q0", "Q1", "Q2", "Q3"]
    if announce:
        assert [len(b) for b in decoder.batches] == [4]  # the first row waited for the rest
    else:
        assert len(decoder.batches) >= 3  # 50 ms apart, a 1 ms wait: (nearly) one row each


def test_a_lone_request_or_a_withdrawn_one_is_not_held() -> None:
    decoder = EchoDecoder()

    async def run() -> tuple[float, float]:
        config = EngineConfig(max_batch_size=8, batch_wait_ms=1, expect_wait_ms=5000)
        engine = Engine(decoder, NoAdapters(), config)
        engine.start()
        try:
            t = time.perf_counter()
            with engine.expect() as mine:
                await engine.generate(request("alone"), expected=mine)
            alone = time.perf_counter() - t
            # another request announced, then failing before its row (say, a bad question)
            t = time.perf_counter()

            async def fails() -> None:
                with engine.expect():
                    await asyncio.sleep(0.1)
                    raise InvalidInputError("question is empty")

            failing = asyncio.create_task(fails())
            with engine.expect() as mine:
                await engine.generate(request("waits for the other"), expected=mine)
            waited = time.perf_counter() - t
            with pytest.raises(InvalidInputError):
                await failing
            assert engine.expected == 0
            return alone, waited
        finally:
            await engine.stop()

    alone, waited = asyncio.run(run())
    assert alone < 1.0  # not the 5 s expect_wait: nothing else was announced
    assert 0.09 < waited < 1.0  # waited for the other until it withdrew, not 5 s


def test_coalescer_batches_what_arrives_while_busy_and_groups_by_key() -> None:
    gate = threading.Event()
    calls: list[tuple[str, list[int]]] = []

    def square(key: str, items: Sequence[int]) -> list[int]:
        calls.append((key, list(items)))
        if items == [0]:
            gate.wait(5)  # the first batch is slow: the rest arrive meanwhile
        return [i * i for i in items]

    async def run() -> list[int]:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            co: Coalescer[str, int, int] = Coalescer(square, pool)
            first = asyncio.create_task(co.submit("a", 0))
            await asyncio.sleep(0.05)
            rest = [asyncio.create_task(co.submit("ab"[i % 2], i)) for i in range(1, 7)]
            await asyncio.sleep(0.05)
            gate.set()
            out = await asyncio.gather(first, *rest)
            assert co.batches == [1, 6]
            return out

    assert asyncio.run(run()) == [i * i for i in range(7)]
    assert calls == [("a", [0]), ("b", [1, 3, 5]), ("a", [2, 4, 6])]


def test_coalescer_fails_a_bad_item_alone() -> None:
    def check(key: None, items: Sequence[str]) -> list[str]:
        if "bad" in items:
            raise InvalidInputError("item 'bad' is bad")
        return [i.upper() for i in items]

    async def run() -> list[str | BaseException]:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            co: Coalescer[None, str, str] = Coalescer(check, pool)
            calls = [co.submit(None, i) for i in ("x", "bad", "y")]
            return await asyncio.gather(*calls, return_exceptions=True)

    x, bad, y = asyncio.run(run())
    assert (x, y) == ("X", "Y")
    assert isinstance(bad, InvalidInputError) and "'bad'" in str(bad)


def test_concurrent_asks_share_one_encoder_call_and_one_batch_and_answer_as_alone(
    client_factory, tiny_generators, adapters_root
) -> None:
    """Through the real app: 8 asks sent together are encoded in a few encoder calls (the
    first starts with whatever has arrived; the rest arrive while it runs), generated in one
    batch (the first row waits for the announced others), and answered exactly as alone."""
    import httpx

    from tests.tiny import save_lora_adapter

    save_lora_adapter(tiny_generators["t5"], adapters_root / "task", seed=1)
    client = client_factory("t5", max_new_tokens=4, expect_wait_ms=10_000, max_batch_size=8)
    questions = [f"Where was the tidal clock number {i} built?" for i in range(8)]
    bodies = [
        {"question": q, "top_k": 2, "adapter": "task" if i % 2 else None}
        for i, q in enumerate(questions)
    ]
    alone = [client.post("/ask", json=b).json() for b in bodies]
    service = client.app.state.lorag.service
    sizes_before = list(service.engine.stats.batch_sizes)
    encodes_before = len(service._retrievals.batches)

    async def together() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            return list(await asyncio.gather(*(ac.post("/ask", json=b) for b in bodies)))

    resps = client.portal.call(together)
    assert [r.status_code for r in resps] == [200] * 8
    for got, want in zip(resps, alone, strict=True):
        data = got.json()
        assert data["answer"] == want["answer"]
        assert [p["id"] for p in data["passages"]] == [p["id"] for p in want["passages"]]
    assert len(set(a["answer"] for a in alone)) > 1  # the rows really differ
    assert list(service.engine.stats.batch_sizes)[len(sizes_before) :] == [8]
    # base rows and adapter rows are one retrieval group (a plain adapter has no question part);
    # how many arrive before the first encoder call starts depends on the machine's load
    encodes = service._retrievals.batches[encodes_before:]
    assert sum(encodes) == 8 and len(encodes) <= 3, encodes


def test_coalescer_fails_its_callers_when_its_executor_is_gone() -> None:
    """At shutdown nothing waits forever: a call after the executor stopped gets its error."""

    async def run() -> BaseException:
        pool = concurrent.futures.ThreadPoolExecutor(1)
        pool.shutdown()
        co: Coalescer[None, int, int] = Coalescer(lambda key, items: list(items), pool)
        try:
            await asyncio.wait_for(co.submit(None, 1), timeout=5)
        except RuntimeError as exc:
            return exc
        raise AssertionError("the call did not fail")

    assert "shutdown" in str(asyncio.run(run()))
