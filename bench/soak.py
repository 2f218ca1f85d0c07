"""Soak: concurrent clients for minutes while an adapter is loaded or unloaded every second.

A real `lorag serve` (the embedded default: SmolLM2-135M-Instruct, the demo index, the shipped
adapters in adapters/) answers --clients closed-loop clients for --seconds. Each request asks a
demo question with no adapter, `concise` or `cited`, in concat mode or (one in eight) token
mode. Meanwhile a toggler alternates `PUT /adapters/concise` and `DELETE /adapters/concise`
once a second. Every /ask should succeed: lazy loading brings `concise` back for a request
that names it while it is unloaded. Every toggle should succeed too (201/200, 204).

Reported: requests and failures (status and detail of each distinct failure), p50/p99
latency overall and per adapter, toggles done, and the server's resident memory (VmRSS from
/proc) after the warm-up (--warmup seconds) and at the end; the growth is printed last.

    .venv/bin/python -m bench.soak [--seconds 300] [--clients 16] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.serve_throughput import free_port, pct

QUESTIONS = json.loads(Path("index/sources/demo_questions.json").read_text())["questions"]
ADAPTERS: list[str | None] = [None, "concise", "cited"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient() as ac:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit("server exited before it was ready")
            try:
                if (await ac.get(f"{url}/ready", timeout=2)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise SystemExit("server not ready in 900 s")


class Soak:
    def __init__(self, url: str, pid: int, args: argparse.Namespace) -> None:
        self.url, self.pid, self.args = url, pid, args
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)
        self.failures: collections.Counter[str] = collections.Counter()
        self.toggles = collections.Counter[str]()
        self.rss: list[tuple[float, int]] = []
        self.op_latencies: list[float] = []
        self.stop = asyncio.Event()

    async def client(self, ac: httpx.AsyncClient, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            q = rng.choice(QUESTIONS)
            adapter = rng.choice(ADAPTERS)
            body = {
                "question": q["question"],
                "adapter": adapter,
                "top_k": 3,
                "mode": "token" if rng.random() < 0.125 else "concat",
            }
            t = time.perf_counter()
            try:
                r = await ac.post(f"{self.url}/ask", json=body)
            except httpx.HTTPError as exc:
                self.failures[f"{type(exc).__name__}: {exc}"] += 1
                continue
            if r.status_code != 200:
                self.failures[f"/ask {r.status_code}: {r.text[:200]}"] += 1
                continue
            self.latencies[adapter or "base"].append((time.perf_counter() - t) * 1000)

    async def toggle(self, ac: httpx.AsyncClient, load: bool) -> None:
        t = time.perf_counter()
        if load:
            r = await ac.put(f"{self.url}/adapters/concise", json={"path": "concise"})
            ok = r.status_code in (200, 201)
        else:
            r = await ac.delete(f"{self.url}/adapters/concise")
            # 404: the PUT before it is still queued, or it was unloaded and not asked for since
            ok = r.status_code in (204, 404)
        self.toggles[f"{'PUT' if load else 'DELETE'} {r.status_code}"] += 1
        self.op_latencies.append((time.perf_counter() - t) * 1000)
        if not ok:
            self.failures[f"toggle {r.status_code}: {r.text[:200]}"] += 1

    async def toggler(self, ac: httpx.AsyncClient) -> None:
        """One load or unload a second, on the clock: each op waits its turn in the engine's
        queue (between batches), so it is not awaited before the next is sent."""
        ops = []
        load = True
        while not self.stop.is_set():
            ops.append(asyncio.create_task(self.toggle(ac, load)))
            load = not load
            await asyncio.sleep(1.0)
        await asyncio.gather(*ops)

    async def sampler(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            self.rss.append((time.monotonic() - start, rss_bytes(self.pid)))
            await asyncio.sleep(5)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.args.clients)
        # the toggler has its own connections: ops still waiting for their turn must not hold
        # the clients' connections (that would show up as /ask latency)
        async with (
            httpx.AsyncClient(timeout=600, limits=limits) as ac,
            httpx.AsyncClient(timeout=600) as admin,
        ):
            tasks = [asyncio.create_task(self.client(ac, i)) for i in range(self.args.clients)]
            tasks += [asyncio.create_task(self.toggler(admin)), asyncio.create_task(self.sampler())]
            await asyncio.sleep(self.args.seconds)
            self.stop.set()
            await asyncio.gather(*tasks)
        self.rss.append((self.args.seconds, rss_bytes(self.pid)))


def report(soak: Soak, args: argparse.Namespace, load: tuple[float, float, float]) -> None:
    every = [v for values in soak.latencies.values() for v in values]
    print(f"{args.clients} clients, {args.seconds} s, max_new_tokens {args.max_new_tokens}")
    print(f"load average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"requests ok: {len(every)} ({len(every) / args.seconds:.2f}/s)")
    print(f"failed requests: {sum(soak.failures.values())}")
    for what, n in soak.failures.most_common():
        print(f"  {n} x {what}")
    print(f"toggles: {dict(soak.toggles)}")
    ops = soak.op_latencies
    print(
        f"toggle latency (queued behind batches): p50 {pct(ops, 50):.0f} ms  "
        f"p99 {pct(ops, 99):.0f} ms"
    )
    print(f"latency all: p50 {pct(every, 50):.0f} ms  p99 {pct(every, 99):.0f} ms")
    for name, values in sorted(soak.latencies.items()):
        print(
            f"  {name:8s} n={len(values):5d} p50 {pct(values, 50):6.0f} ms  "
            f"p99 {pct(values, 99):6.0f} ms"
        )
    base = next(rss for t, rss in soak.rss if t >= args.warmup)
    end = soak.rss[-1][1]
    peak = max(rss for _, rss in soak.rss)
    print(
        f"RSS after {args.warmup} s warm-up {base / 2**20:.0f} MiB, end {end / 2**20:.0f} MiB, "
        f"peak {peak / 2**20:.0f} MiB"
    )
    series = [f"{t:.0f}s {rss / 2**20:.0f}" for t, rss in soak.rss[::6]]
    print(f"RSS every 30 s (MiB): {', '.join(series)}")
    print(f"RSS growth after warm-up: {100 * (end - base) / base:+.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=60)
    args = parser.parse_args()
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LORAG_PORT": str(port),
        "LORAG_LOG_LEVEL": "warning",
        "LORAG_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "LORAG_SHUTDOWN_DRAIN_S": "0",
    }
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(url, proc))
        load = os.getloadavg()
        soak = Soak(url, proc.pid, args)
        asyncio.run(soak.run())
        if proc.poll() is not None:
            raise SystemExit(f"the server died during the soak (exit {proc.returncode})")
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    report(soak, args, load)


if __name__ == "__main__":
    main()
