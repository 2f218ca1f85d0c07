"""Helpers that drive the service in tests: the app in process with its decoding steps slowed
down, concurrent POST /ask from one event loop, and `lorag serve` in a real uvicorn process.

Tiny models decode a step in about a millisecond, faster than a test can send requests in
between; slow_steps wraps StepBatch.step with a short sleep so that rows really arrive while
others decode.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

STEP_DELAY_S = 0.02


def slow_steps(client: Any) -> Any:
    """Slow every decoding step of client's engine by STEP_DELAY_S; returns the engine."""
    engine = client.app.state.lorag.service.engine
    stepper = engine._stepper
    assert stepper is not None, "step-level batching is on by default"
    step = stepper.step

    def slowed() -> Any:
        time.sleep(STEP_DELAY_S)
        return step()

    stepper.step = slowed
    return engine


def body(i: int, *, tokens: int, adapter: str | None = None, mode: str = "concat") -> dict:
    """A POST /ask body; i makes the question, so the answer, differ between requests."""
    return {
        "question": f"Where was the tidal clock number {i} built?",
        "top_k": 2,
        "max_new_tokens": tokens,
        "adapter": adapter,
        "mode": mode,
    }


async def post_all(client: Any, sends: list[tuple[float, dict]]) -> list[tuple[float, Any]]:
    """POST each body after its delay; (finish time, response) per body, in order."""
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as ac:
        start = time.perf_counter()

        async def one(delay: float, b: dict) -> tuple[float, Any]:
            await asyncio.sleep(delay)
            r = await ac.post("/ask", json=b)
            return time.perf_counter() - start, r

        return list(await asyncio.gather(*(one(d, b) for d, b in sends)))


def post_watching(
    client: Any, engine: Any, sends: list[tuple[float, dict]]
) -> tuple[list[tuple[float, Any]], list[int]]:
    """post_all, and the engine's running rows sampled every 2 ms meanwhile."""
    widths: list[int] = []

    async def run() -> list[tuple[float, Any]]:
        async def watch() -> None:
            while True:
                widths.append(engine.running_rows)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        try:
            return await post_all(client, sends)
        finally:
            watcher.cancel()

    return client.portal.call(run), widths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(
    env: dict[str, str], *, expect_ready: bool = True
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`lorag serve` with env on a free local port: (base url, process), stopped on exit."""
    port = free_port()
    full = {**os.environ, **env, "LORAG_HOST": "127.0.0.1", "LORAG_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if expect_ready:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate()[0]
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            else:
                raise AssertionError("server not ready in 240 s")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
