"""SIGTERM on a real `lorag serve`: readiness goes false first, requests are still answered
during the drain, then the process stops listening and exits."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from tests.serving import serve

DRAIN_S = 4.0


def test_sigterm_turns_readiness_off_before_the_socket_closes(
    index_root: Path, tiny_generators: dict[str, Path], tmp_path: Path
) -> None:
    env = {
        "LORAG_INDEX_DIR": str(index_root),
        "LORAG_INDEX_NAME": "facts",
        "LORAG_GENERATOR": str(tiny_generators["t5"]),
        "LORAG_CACHE_DIR": str(tmp_path / "cache"),
        "LORAG_MAX_NEW_TOKENS": "4",
        "LORAG_SHUTDOWN_DRAIN_S": str(DRAIN_S),
    }
    with serve(env) as (url, proc):
        q = {"question": "Where was the tidal clock built?", "top_k": 2}
        before = httpx.post(f"{url}/ask", json=q, timeout=60)
        assert before.status_code == 200, before.text

        os.kill(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        during = httpx.post(f"{url}/ask", json=q, timeout=60)  # still admitted while draining
        assert during.status_code == 200, during.text
        assert during.json()["answer"] == before.json()["answer"]
        assert time.monotonic() - signalled < DRAIN_S, "the checks above ran after the drain"
        assert proc.poll() is None  # nothing closed yet

        out, _ = proc.communicate(timeout=60)
        stopped = time.monotonic() - signalled
        assert stopped >= DRAIN_S - 0.2, f"exited {stopped:.1f} s after SIGTERM, before the drain"
        # uvicorn re-raises the signal after a graceful shutdown
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "not ready; answering for" in out and "drain over" in out
        try:
            httpx.get(f"{url}/health", timeout=2)
        except httpx.TransportError:
            pass
        else:
            raise AssertionError("the server still answers after it exited")
