"""Cold start and /ask latency of the embedded default, through a real uvicorn process.

Cold start: from process launch to the first 200 from /ready (models already converted by
`lorag prepare`, as after the first `make serve`). Latency: sequential /ask requests over
the demo questions, after one warm-up request. Prints p50/p95 per phase, the ratio of
generation to retrieval time last.

    .venv/bin/python -m bench.serve_latency [--requests 20] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUESTIONS_FILE = Path("index/sources/demo_questions.json")
FALLBACK = ["What is the capital of Alaska?", "What does ASCII stand for?"]


def questions() -> list[str]:
    if QUESTIONS_FILE.exists():
        data = json.loads(QUESTIONS_FILE.read_text())
        return [q["question"] for q in data["questions"]]
    return FALLBACK


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LORAG_PORT": str(port), "LORAG_LOG_LEVEL": "warning"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit("server exited during start-up")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        cold = time.perf_counter() - t0
        qs = questions()
        body = {"top_k": args.top_k, "max_new_tokens": args.max_new_tokens}
        httpx.post(f"{url}/ask", json={"question": qs[0], **body}, timeout=300)  # warm-up
        total, retrieve, generate = [], [], []
        for i in range(args.requests):
            q = qs[i % len(qs)]
            t = time.perf_counter()
            r = httpx.post(f"{url}/ask", json={"question": q, **body}, timeout=300)
            total.append((time.perf_counter() - t) * 1000)
            r.raise_for_status()
            timings = r.json()["timings_ms"]
            retrieve.append(timings["retrieve"])
            generate.append(timings["generate"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"cold start to ready: {cold:.2f} s")
    print(f"/ask x{args.requests}, top_k={args.top_k}, max_new_tokens={args.max_new_tokens}:")
    for name, vals in (("total (client)", total), ("retrieve", retrieve), ("generate", generate)):
        print(f"  {name:15s} p50 {pct(vals, 50):8.1f} ms   p95 {pct(vals, 95):8.1f} ms")
    print(
        f"generate/retrieve time ratio (median): "
        f"{statistics.median(generate) / statistics.median(retrieve):.1f}"
    )


if __name__ == "__main__":
    main()
