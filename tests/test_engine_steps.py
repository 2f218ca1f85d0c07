"""Step-level scheduling through the real app: rows join a running batch between decoding
steps, leave when they finish or when their client leaves, and answer exactly as alone.

Tiny models decode a step in about a millisecond, faster than a test can send requests in
between; each step is slowed (tests/serving.py's slow_steps wraps StepBatch.step with a short
sleep) so that rows really arrive while others decode. What is checked is scheduling; the tokens
themselves are checked against rows alone (and those against transformers) in test_stepping.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.serving import body, post_all, post_watching, slow_steps
from tests.tiny import save_lora_adapter


def test_rows_join_a_running_batch_leave_when_done_and_answer_as_alone(
    client_factory, tiny_generators, adapters_root, backend
) -> None:
    save_lora_adapter(tiny_generators[backend], adapters_root / "task", seed=1)
    client = client_factory(backend, max_batch_size=8, batch_wait_ms=1, expect_wait_ms=0)
    engine = slow_steps(client)
    long = body(0, tokens=60)
    short = [body(i, tokens=3, adapter="task" if i % 2 else None) for i in range(1, 6)]
    token_mode = body(9, tokens=4, adapter="task", mode="token")
    sequence_mode = body(10, tokens=4, mode="sequence")
    alone = [client.post("/ask", json=b).json() for b in [long, *short, token_mode, sequence_mode]]
    steps_before, joined_before = engine.stats.steps, engine.stats.joined_running

    sends = [(0.0, long)] + [(0.15 + 0.05 * i, b) for i, b in enumerate(short)]
    sends += [(0.3, token_mode), (0.35, sequence_mode)]
    done = client.portal.call(post_all, client, sends)

    assert [r.status_code for _, r in done] == [200] * len(sends)
    for (_, got), want in zip(done, alone, strict=True):
        assert got.json()["answer"] == want["answer"]
        assert got.json()["generated_tokens"] == want["generated_tokens"]
        weights = [p["weight"] for p in got.json()["passages"]]
        assert weights == pytest.approx([p["weight"] for p in want["passages"]], abs=1e-6)
    assert len({a["answer"] for a in alone}) > 2  # the rows really differ
    # the short rows and the token- and sequence-mode requests (a row per passage) joined the
    # long row while it decoded, and were answered before it ended
    assert engine.stats.joined_running - joined_before == 7
    long_done = done[0][0]
    assert all(t < long_done for t, _ in done[1:])
    # the long row's 60 tokens took about 60 steps, not 60 plus a batch per joiner
    assert engine.stats.steps - steps_before < 60 + 10
    assert engine.running == 0 and engine.queue_depth == 0


def test_a_client_that_leaves_takes_its_row_out_of_the_running_batch(
    client_factory, tiny_generators
) -> None:
    client = client_factory("t5", max_batch_size=8, batch_wait_ms=1)
    engine = slow_steps(client)
    want = client.post("/ask", json=body(2, tokens=5)).json()["answer"]

    async def run() -> tuple[int, str]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            leaving = asyncio.create_task(ac.post("/ask", json=body(1, tokens=200)))
            while engine.running < 1:
                await asyncio.sleep(0.01)
            staying = asyncio.create_task(ac.post("/ask", json=body(2, tokens=5)))
            await asyncio.sleep(0.1)
            leaving.cancel()  # the client goes away mid-answer
            with pytest.raises(asyncio.CancelledError):
                await leaving
            answer = (await staying).json()["answer"]
            steps = engine.stats.steps
            deadline = time.monotonic() + 5
            while engine.running and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            return engine.stats.steps - steps, answer

    extra_steps, answer = client.portal.call(run)
    assert answer == want
    assert engine.running == 0
    assert extra_steps < 20  # not the 200 steps the row that left asked for


def test_a_hot_swap_between_steps_leaves_running_rows_on_their_version(
    client_factory, tiny_generators, adapters_root
) -> None:
    model = tiny_generators["llama"]
    save_lora_adapter(model, adapters_root / "v1", seed=1)
    save_lora_adapter(model, adapters_root / "v2", seed=2)
    client = client_factory("llama", max_batch_size=8, batch_wait_ms=1)
    engine = slow_steps(client)
    admin = {"path": "v2"}
    assert client.put("/adapters/task", json={"path": "v1"}).status_code == 201
    v1 = client.post("/ask", json=body(1, tokens=30, adapter="task")).json()

    async def run() -> tuple[Any, Any, Any]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as ac:
            running = asyncio.create_task(ac.post("/ask", json=body(1, tokens=30, adapter="task")))
            while engine.running < 1:
                await asyncio.sleep(0.01)
            swap = await ac.put("/adapters/task", json=admin)  # lands between two steps
            after = await ac.post("/ask", json=body(1, tokens=30, adapter="task"))
            return await running, swap, after

    first, swap, after = client.portal.call(run)
    assert swap.status_code == 200
    assert first.status_code == 200
    assert first.json()["answer"] == v1["answer"]
    assert first.json()["adapter_version"] == v1["adapter_version"]
    assert after.json()["adapter_version"] != v1["adapter_version"]
    assert after.json()["answer"] != v1["answer"]


def test_with_beams_rag_requests_join_the_running_batch(client_factory) -> None:
    """LORAG_NUM_BEAMS 2: RAG-Token and RAG-Sequence requests join the running batch, their
    beam searches a step at a time; both answer as alone, while a concat row decodes."""
    client = client_factory("t5", num_beams=2, max_batch_size=16, batch_wait_ms=1)
    engine = slow_steps(client)
    stepper = engine._stepper
    assert stepper.num_beams == 2 and stepper.rows_for("token", 2) == 4
    long = body(0, tokens=40)
    token, sequence = body(1, tokens=6, mode="token"), body(2, tokens=4, mode="sequence")
    alone = [client.post("/ask", json=b).json() for b in (long, token, sequence)]
    joined_before = engine.stats.joined_running
    done = client.portal.call(post_all, client, [(0.0, long), (0.2, token), (0.3, sequence)])
    for (_, got), want in zip(done, alone, strict=True):
        assert got.json()["answer"] == want["answer"]
        weights = [p["weight"] for p in got.json()["passages"]]
        assert weights == pytest.approx([p["weight"] for p in want["passages"]], abs=1e-6)
    assert done[1][0] < done[0][0] and done[2][0] < done[0][0]  # while the long row decoded
    assert engine.stats.joined_running - joined_before == 2  # both joined


def test_step_batching_off_decodes_whole_batches(client_factory) -> None:
    """LORAG_STEP_BATCHING=false: a request that arrives while a batch decodes waits for that
    batch to end (no row joins a running batch), and answers as alone."""
    client = client_factory("t5", step_batching=False, batch_wait_ms=1, expect_wait_ms=0)
    engine = slow_steps(client)
    long, short = body(0, tokens=25), body(1, tokens=4)
    alone = [client.post("/ask", json=b).json()["answer"] for b in (long, short)]
    joined_before = engine.stats.joined_running
    done, widths = post_watching(client, engine, [(0.0, long), (0.1, short)])
    (t_long, r_long), (t_short, r_short) = done
    assert [r_long.json()["answer"], r_short.json()["answer"]] == alone
    assert t_short > t_long  # it waited for the whole batch, short as it is
    assert engine.stats.joined_running == joined_before and max(widths) == 1
    assert "lorag_running_rows 0.0" in client.get("/metrics").text


def test_a_full_batch_makes_rows_wait_for_a_slot_and_they_join_as_rows_leave(
    client_factory,
) -> None:
    client = client_factory("t5", max_batch_size=2, batch_wait_ms=1, expect_wait_ms=0)
    engine = slow_steps(client)
    bodies = [body(i, tokens=4 + 3 * i) for i in range(6)]
    alone = [client.post("/ask", json=b).json()["answer"] for b in bodies]
    joined_before = engine.stats.joined_running
    # a fixed arrival order, 30 ms apart: each arrives while rows of other lengths run
    done, widths = post_watching(client, engine, [(0.03 * i, b) for i, b in enumerate(bodies)])
    assert [r.json()["answer"] for _, r in done] == alone
    assert max(widths) == 2  # never more rows than max_batch_size, and the slots were used
    assert engine.stats.joined_running - joined_before >= 3  # waiting rows took freed slots


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_a_rag_request_takes_a_row_per_passage_of_the_batch(client_factory, mode: str) -> None:
    """max_batch_size counts batch rows: a RAG request with 2 passages does not fit beside a
    running row in a batch of 2; it waits for the row to leave, then takes both rows."""
    client = client_factory("t5", max_batch_size=2, batch_wait_ms=1, expect_wait_ms=0)
    engine = slow_steps(client)
    long, rag = body(0, tokens=25), body(1, tokens=5, mode=mode)
    alone = [client.post("/ask", json=b).json() for b in (long, rag)]
    done, widths = post_watching(client, engine, [(0.0, long), (0.1, rag)])
    (t_long, r_long), (t_rag, r_rag) = done
    assert [r_long.json()["answer"], r_rag.json()["answer"]] == [a["answer"] for a in alone]
    assert t_rag > t_long  # it waited for the long row: 1 + 2 rows do not fit in 2
    assert max(widths) == 2 and 1 in widths


def test_a_rag_request_wider_than_the_batch_runs_alone(client_factory) -> None:
    """A RAG-Token request with more passages than max_batch_size rows is not refused or left
    waiting: it runs as the only request of the batch."""
    client = client_factory("t5", max_batch_size=2, batch_wait_ms=1, expect_wait_ms=0)
    engine = slow_steps(client)
    wide = {**body(1, tokens=4, mode="token"), "top_k": 3}
    want = client.post("/ask", json=wide).json()
    assert len(want["passages"]) == 3
    done, widths = post_watching(client, engine, [(0.0, body(0, tokens=12)), (0.05, wide)])
    (_, first), (_, got) = done
    assert first.status_code == 200 and got.status_code == 200
    assert got.json()["answer"] == want["answer"]
    assert max(widths) == 3 and 2 not in widths[widths.index(3) :]  # alone, after the first


def log_joins_and_steps(stepper: Any) -> list[object]:
    """Record the step batch's calls in order: each join's row count, "step" for each step."""
    log: list[object] = []
    join, step = stepper.join, stepper.step

    def logged_join(rows, keys):
        log.append(len(rows))
        return join(rows, keys)

    def logged_step():
        log.append("step")
        return step()

    stepper.join, stepper.step = logged_join, logged_step
    return log


@pytest.mark.parametrize("budget", [0, 1])
def test_the_prefill_budget_puts_decoding_steps_between_joiners(client_factory, budget) -> None:
    """LORAG_PREFILL_TOKENS_PER_STEP: while a row decodes, a burst of arrivals joins a budget's
    worth of prompt tokens at a time (at least one request) with a decoding step between, not
    all in one prefill; without a limit (0) the burst joins together."""
    client = client_factory(
        "t5", prefill_tokens_per_step=budget, max_batch_size=8, batch_wait_ms=1, expect_wait_ms=0
    )
    engine = slow_steps(client)
    stepper = engine._stepper
    log = log_joins_and_steps(stepper)
    burst = [body(i, tokens=3) for i in range(1, 5)]
    alone = [client.post("/ask", json=b).json()["answer"] for b in burst]
    log.clear()
    done = client.portal.call(
        post_all, client, [(0.0, body(0, tokens=40))] + [(0.2, b) for b in burst]
    )
    assert [r.json()["answer"] for _, r in done[1:]] == alone
    joins = [i for i, e in enumerate(log) if e != "step"][1:]  # after the long row's own
    sizes = [log[i] for i in joins]
    assert sum(sizes) == 4
    if budget:
        assert sizes == [1, 1, 1, 1]
        assert all(log[a + 1] == "step" for a in joins)  # a step after every joiner
    else:
        assert max(sizes) >= 2  # the burst joined together


def test_the_prefill_budget_counts_only_what_the_prefix_cache_does_not_hold(
    client_factory, tiny_generators, adapters_root
) -> None:
    """A burst of joiners whose prompts the prefix cache holds (under their adapter) costs
    the budget only the tokens their prefill computes: at a budget that their whole prompts
    would split into one joiner per step, they join together, with the same answers."""
    from app.contracts import GenRow, Passage

    save_lora_adapter(tiny_generators["llama"], adapters_root / "task", seed=1)
    burst = [body(i, tokens=3, adapter="task") for i in range(1, 5)]
    probe = client_factory("llama", batch_wait_ms=1, expect_wait_ms=0)
    probe.put("/adapters/task", json={"path": "task"})

    def row(client: Any, b: dict, passages: list[dict]) -> GenRow:
        registry = client.app.state.lorag.service.registry
        return GenRow(
            b["question"],
            [Passage(p["id"], p["doc_id"], p["title"], p["text"]) for p in passages],
            registry.peft_name("task"),
            b["max_new_tokens"],
        )

    listed = [probe.post("/ask", json=b).json()["passages"] for b in burst]
    cold = probe.app.state.lorag.service.engine._stepper
    cold.prefixes = None  # counts whole prompts
    full = [cold.prompt_tokens(row(probe, b, ps)) for b, ps in zip(burst, listed, strict=True)]
    budget = max(full) + 1
    assert 2 * min(full) > budget  # whole prompts: one joiner per step boundary

    client = client_factory(
        "llama",
        prefill_tokens_per_step=budget,
        max_batch_size=8,
        batch_wait_ms=1,
        expect_wait_ms=0,
    )
    client.put("/adapters/task", json={"path": "task"})
    engine = slow_steps(client)
    stepper = engine._stepper
    alone = [client.post("/ask", json=b).json()["answer"] for b in burst]  # caches them
    rest = [stepper.prompt_tokens(row(client, b, ps)) for b, ps in zip(burst, listed, strict=True)]
    assert sum(rest) <= budget  # what their prefill computes now fits one boundary
    log = log_joins_and_steps(stepper)
    done = client.portal.call(
        post_all,
        client,
        [(0.0, body(0, tokens=40, adapter="task"))] + [(0.2, b) for b in burst],
    )
    assert [r.json()["answer"] for _, r in done[1:]] == alone
    sizes = [e for e in log if e != "step"][1:]  # after the long row's own
    # two or more joined at one boundary: whole prompts could not (the budget's assert above)
    assert sum(sizes) == 4 and max(sizes) >= 2


def test_first_token_and_token_gap_metrics(client_factory) -> None:
    """/metrics: each step-batched request's time to its first token, and the gaps between
    two tokens of running answers (at least the slowed step each)."""
    client = client_factory("t5", batch_wait_ms=1, expect_wait_ms=0)
    slow_steps(client)
    client.portal.call(post_all, client, [(0.0, body(0, tokens=10)), (0.05, body(1, tokens=4))])
    text = client.get("/metrics").text

    def sample(name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        return float(line.split()[-1])

    assert sample("lorag_time_to_first_token_seconds_count") == 2
    gaps = sample("lorag_token_gap_seconds_count")
    assert gaps >= 8  # about one per step of the 10-token answer
    assert sample('lorag_token_gap_seconds_bucket{le="0.01"}') == 0  # no step under 20 ms


def test_prefix_cache_hits_prefill_before_cold_prompts_admitted_beside_them(
    client_factory, tiny_generators, adapters_root
) -> None:
    """Joiners whose prompts the prefix cache holds prefill in a call of their own, before the
    cold joiners admitted at the same step boundary, so their first token does not wait for
    the cold prompts' prefill; every answer as alone."""
    from app.generation.step_batch import CALL_COST_TOKENS

    save_lora_adapter(tiny_generators["llama"], adapters_root / "task", seed=1)
    hot = [body(i, tokens=3) for i in (1, 2)]
    cold = [body(i, tokens=3, adapter="task") for i in (3, 4)]  # nothing cached under it
    probe = client_factory("llama", batch_wait_ms=1, expect_wait_ms=0)
    probe.put("/adapters/task", json={"path": "task"})
    alone = {b["question"]: probe.post("/ask", json=b).json()["answer"] for b in hot + cold}

    client = client_factory("llama", max_batch_size=8, batch_wait_ms=1, expect_wait_ms=0)
    client.put("/adapters/task", json={"path": "task"})
    engine = client.app.state.lorag.service.engine
    stepper = engine._stepper
    for b in hot:  # their prompts are cached now
        assert client.post("/ask", json=b).json()["answer"] == alone[b["question"]]
    calls: list[object] = []  # each join's questions, "step" for each step
    join, step = stepper.join, stepper.step

    def logged_join(rows, keys):
        calls.append([r.question for r in rows])
        for r in rows:
            calls.append(("cost", r.question, stepper.prompt_tokens(r)))
        return join(rows, keys)

    def held_step():  # the long row's first step waits until the burst is queued
        if calls.count("step") == 0:
            deadline = time.monotonic() + 10
            while engine.queue_depth < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
        calls.append("step")
        return step()

    stepper.join, stepper.step = logged_join, held_step
    burst = [cold[0], hot[0], cold[1], hot[1]]  # queue order: cold first
    done = client.portal.call(
        post_all, client, [(0.0, body(0, tokens=6))] + [(0.1, b) for b in burst]
    )
    assert [r.json()["answer"] for _, r in done[1:]] == [alone[b["question"]] for b in burst]
    joins = [c for c in calls if isinstance(c, list)]
    costs = {q: n for c in calls if isinstance(c, tuple) for _, q, n in [c]}
    assert all(costs[b["question"]] < CALL_COST_TOKENS for b in hot)
    assert all(costs[b["question"]] >= CALL_COST_TOKENS for b in cold)
    # the long row's join, then the hits together, then the cold prompts: one boundary
    assert [sorted(j) for j in joins[1:]] == [
        [b["question"] for b in hot],
        [b["question"] for b in cold],
    ]
    steps = [i for i, c in enumerate(calls) if c == "step"]
    hits, colds = calls.index(joins[1]), calls.index(joins[2])
    assert steps[0] < hits < colds < steps[1]  # both at the boundary after the first step


def test_a_prompt_the_base_prefilled_climbs_under_an_adapter_of_the_upper_layers(
    client_factory, tiny_generators, adapters_root
) -> None:
    """Through the real app: an adapter that changes only the tiny llama's second layer takes
    the first layer's blocks that the base's request computed; /ask's timings say it reused
    half of those blocks' tokens (one layer of two) and /metrics counts them climbed. The answer
    is the one the adapter gives with the cache off."""
    save_lora_adapter(tiny_generators["llama"], adapters_root / "upper", seed=1, layers=[1])
    question = body(1, tokens=4)
    tuned = {**question, "adapter": "upper"}
    off = client_factory("llama", prefix_cache_bytes=0)
    off.put("/adapters/upper", json={"path": "upper"})
    want = off.post("/ask", json=tuned).json()
    client = client_factory("llama", batch_wait_ms=1)
    client.put("/adapters/upper", json={"path": "upper"})
    base = client.post("/ask", json=question).json()
    got = client.post("/ask", json=tuned).json()
    assert got["answer"] == want["answer"] and got["answer"] != base["answer"]
    assert base["timings_ms"]["reused_prompt_tokens"] == 0
    reused = got["timings_ms"]["reused_prompt_tokens"]
    assert reused > 0 and reused % 8 == 0  # half of whole 16-token blocks
    metrics = client.get("/metrics").text
    climbed = next(x for x in metrics.splitlines() if x.startswith("lorag_prefix_cache_climbed"))
    assert float(climbed.split()[-1]) == 2 * reused
