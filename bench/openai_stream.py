"""Streaming through OpenAI's API against /ask's own: time to first token and inter-token
latency, the same questions through both, on one running server.

Arm A is the official `openai` SDK streaming /v1/chat/completions; arm B is POST /ask with
`"stream": true` read as server-sent events with httpx. Requests alternate A B, B A, ... (so
neither arm always goes first, after a warm-up of every question through both), greedy, the
same question, top_k and answer length per pair, so the two arms decode the same tokens.
Time to first token: from sending to the first non-empty text piece; inter-token latency: the
gaps between text pieces after it. With --concurrency N, N workers run such sequences at
once. Prints p50 and p99 per arm, and the ratios (A / B) last: the goal is 1 within noise.

    .venv/bin/lorag serve &   # LORAG_PORT=8000
    .venv/bin/python -m bench.openai_stream --url http://127.0.0.1:8000 [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import httpx
import openai

QUESTIONS_FILE = Path("index/sources/demo_questions.json")


@dataclass
class Arm:
    ttft_ms: list[float] = field(default_factory=list)
    itl_ms: list[float] = field(default_factory=list)

    def record(self, start: float, stamps: list[float], text: str) -> str:
        if stamps:
            self.ttft_ms.append((stamps[0] - start) * 1000)
            self.itl_ms += [(b - a) * 1000 for a, b in pairwise(stamps)]
        return text


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def questions() -> list[str]:
    data = json.loads(QUESTIONS_FILE.read_text())
    return [q["question"] for q in data["questions"]]


async def via_openai(
    client: openai.AsyncOpenAI, model: str, q: str, args: argparse.Namespace, arm: Arm
) -> str:
    start = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": q}],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        extra_body={"top_k": args.top_k},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            pieces.append(chunk.choices[0].delta.content)
    return arm.record(start, stamps, "".join(pieces))


async def via_ask(http: httpx.AsyncClient, q: str, args: argparse.Namespace, arm: Arm) -> str:
    body = {"question": q, "top_k": args.top_k, "max_new_tokens": args.max_tokens, "stream": True}
    start = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    kind = None
    async with http.stream("POST", "/ask", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: ") and kind == "token":
                text = json.loads(line[len("data: ") :])["text"]
                if text:
                    stamps.append(time.perf_counter())
                    pieces.append(text)
    return arm.record(start, stamps, "".join(pieces))


async def run(args: argparse.Namespace) -> tuple[Arm, Arm, int]:
    key = args.api_key or "none"
    client = openai.AsyncOpenAI(base_url=f"{args.url}/v1", api_key=key, max_retries=0, timeout=300)
    headers = {"Authorization": f"Bearer {key}"}
    http = httpx.AsyncClient(base_url=args.url, headers=headers, timeout=300)
    model = (await client.models.list()).data[0].id  # the base
    qs = questions()
    a, b = Arm(), Arm()
    for q in qs:  # warm-up: every question once through each path (and any prompt cache)
        await via_openai(client, model, q, args, Arm())
        await via_ask(http, q, args, Arm())
    same = 0

    async def worker(w: int) -> None:
        nonlocal same
        for i in range(args.rounds):
            q = qs[(w + i) % len(qs)]
            if i % 2 == 0:  # A B, then B A: neither arm always goes first
                text_a = await via_openai(client, model, q, args, a)
                text_b = await via_ask(http, q, args, b)
            else:
                text_b = await via_ask(http, q, args, b)
                text_a = await via_openai(client, model, q, args, a)
            same += text_a == text_b

    await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
    await client.close()
    await http.aclose()
    return a, b, same


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None, help="LORAG_API_TOKEN, if the server has one")
    ap.add_argument("--rounds", type=int, default=10, help="A B pairs per worker")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args()
    a, b, same = asyncio.run(run(args))
    pairs = args.rounds * args.concurrency
    print(f"{pairs} A/B pairs, concurrency {args.concurrency}; the same answer in {same}")
    for name, arm in (("A /v1/chat/completions (openai SDK)", a), ("B /ask SSE (httpx)", b)):
        print(
            f"{name}: TTFT p50 {pct(arm.ttft_ms, 50):.1f} ms p99 {pct(arm.ttft_ms, 99):.1f} ms; "
            f"ITL p50 {pct(arm.itl_ms, 50):.1f} ms p99 {pct(arm.itl_ms, 99):.1f} ms "
            f"({len(arm.itl_ms)} gaps)"
        )
    for what, p in (("TTFT", 50), ("TTFT", 99)):
        print(f"ratio A/B {what} p{p}: {pct(a.ttft_ms, p) / pct(b.ttft_ms, p):.3f}")
    for p in (50, 99):
        print(f"ratio A/B ITL p{p}: {pct(a.itl_ms, p) / pct(b.itl_ms, p):.3f}")


if __name__ == "__main__":
    main()
