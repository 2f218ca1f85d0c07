"""POST /ask with "stream": true: server-sent events through the real app.

The reference is the same request answered whole (no stream): the token events must join into
exactly its answer, and the final `done` event must carry its response. Steps are slowed as in
test_engine_steps.py (tests/serving.py's slow_steps), so that tokens really arrive over several
steps.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.serving import STEP_DELAY_S, body, slow_steps
from tests.tiny import save_lora_adapter


def events(client: Any, payload: dict, times: list[float] | None = None) -> list[tuple[str, Any]]:
    """(event, data) of one streamed /ask, in order (and when each came, into times)."""
    out: list[tuple[str, Any]] = []
    with client.stream("POST", "/ask", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[len("data: ") :])))
                if times is not None:
                    times.append(time.perf_counter())
    return out


@pytest.mark.parametrize("mode", ["concat", "token"])
def test_a_streamed_answer_arrives_token_by_token_and_equals_the_whole_one(
    client_factory, tiny_generators, adapters_root, backend, mode: str
) -> None:
    save_lora_adapter(tiny_generators[backend], adapters_root / "task", seed=1)
    client = client_factory(backend, batch_wait_ms=1, expect_wait_ms=0)
    slow_steps(client)
    # a tiny random model's answer to some questions decodes to no text at all; stream the
    # first of these questions whose answer has some, so the pieces have something to join
    for i in range(3, 12):
        payload = {**body(i, tokens=12, adapter="task", mode=mode)}
        whole = client.post("/ask", json=payload).json()
        if whole["answer"]:
            break
    times: list[float] = []
    got = events(client, {**payload, "stream": True}, times)

    kinds = [k for k, _ in got]
    assert kinds[0] == "passages" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"token"} and len(kinds) >= 4
    # the first piece came while the answer was decoded (12 steps of at least 20 ms each)
    assert times[-1] - times[1] > 3 * STEP_DELAY_S
    text = "".join(d["text"] for k, d in got if k == "token")
    done = got[-1][1]
    assert text == done["answer"] == whole["answer"]
    assert done["generated_tokens"] == whole["generated_tokens"]
    assert done["adapter_version"] == whole["adapter_version"]
    assert [p["id"] for p in got[0][1]] == [p["id"] for p in whole["passages"]]
    assert [p["score"] for p in got[0][1]] == pytest.approx([p["score"] for p in whole["passages"]])
    weights = [p["weight"] for p in done["passages"]]
    assert weights == pytest.approx([p["weight"] for p in whole["passages"]], abs=1e-6)


def test_a_streamed_rag_sequence_answer_comes_at_the_end(client_factory) -> None:
    """RAG-Sequence chooses its answer when every passage's hypothesis has ended: one piece."""
    client = client_factory("t5", batch_wait_ms=1, expect_wait_ms=0)
    payload = body(4, tokens=8, mode="sequence")
    whole = client.post("/ask", json=payload).json()
    got = events(client, {**payload, "stream": True})
    assert [k for k, _ in got] == ["passages", "token", "done"]
    assert got[1][1]["text"] == got[2][1]["answer"] == whole["answer"]


def test_errors_before_the_stream_are_plain_4xx(client_factory) -> None:
    client = client_factory("t5")
    r = client.post("/ask", json={**body(1, tokens=4, adapter="nope"), "stream": True})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert "nope" in r.json()["detail"]
    r = client.post("/ask", json={**body(1, tokens=4), "index": "missing", "stream": True})
    assert 400 <= r.status_code < 500 and "missing" in r.json()["detail"]
    assert client.post("/ask", json={**body(1, tokens=4), "stream": "maybe"}).status_code == 422


def test_a_client_that_stops_reading_takes_its_row_out(client_factory) -> None:
    client = client_factory("t5", batch_wait_ms=1, expect_wait_ms=0)
    engine = slow_steps(client)
    steps = engine.stats.steps
    with client.stream("POST", "/ask", json={**body(1, tokens=200), "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break  # the client leaves after the first piece
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0
    assert engine.stats.steps - steps < 100  # not the 200 steps it asked for


def test_a_failure_after_the_stream_began_is_an_error_event(client_factory) -> None:
    """The request times out while decoding: the stream already said 200, so the failure comes
    as an error event with the status it would have had (504), and the row leaves."""
    client = client_factory("t5", request_timeout_s=0.3, batch_wait_ms=1, expect_wait_ms=0)
    engine = slow_steps(client)
    got = events(client, {**body(1, tokens=200), "stream": True})
    assert got[0][0] == "passages" and got[-1][0] == "error"
    assert got[-1][1]["status"] == 504 and "longer than" in got[-1][1]["detail"]
    assert "done" not in [k for k, _ in got]
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0
