"""RAG-Token/RAG-Sequence requests joining the running step batch, against whole batches.

The engine (app/engine/engine.py) with its StepBatch, in one process, fed open loop:
--requests requests arrive at Poisson times (--rate per second, the same times for every
variant of a round), their modes taking turns from --mix (default concat,token), --top-k demo
passages each (the RAG modes read each passage in its own row), --max-new-tokens each, no
adapter. Variants:
- steps: requests join the running batch at step boundaries (a RAG request takes a row per
  passage; the default);
- whole: no request joins a running batch: each batch starts whole and shrinks as its rows
  end, the next forms when it is empty (LORAG_STEP_BATCHING=false).
Both keep max_batch_size --batch rows. The generator is serve_throughput's T5-small-shaped
model with random weights and ByT5's byte vocabulary, which never emits EOS: every request
decodes exactly --max-new-tokens tokens in every variant (answers are empty strings).

Rounds rotate the variants (A B, B A, ...). Printed per round and as medians: throughput
(requests / time from the first arrival to the last answer) and p50/p99 latency per mode and
over all requests; last, steps/whole ratios (latency: lower is better).

    .venv/bin/python -m bench.rag_steps [--requests 40] [--rate 2] [--rounds 3]
        [--top-k 3] [--max-new-tokens 24] [--batch 16] [--mix concat,token,sequence] [--beams 1]

--beams N runs the RAG modes with beam search (DecodingConfig.num_beams): a RAG
request then takes N rows per passage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch

from app.contracts import Mode, Passage
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.requests import EngineRequest
from app.generation.config import DecodingConfig
from app.generation.generator import Generator
from app.generation.loading import load_generator
from app.generation.step_batch import StepBatch
from app.lora.registry import Lease
from bench.serve_throughput import pct, t5_small_shaped


class NoAdapters:
    """The engine's adapter resolver for a deployment without adapters."""

    def begin_batch(self, names: Sequence[str | None], running: Sequence[str | None] = ()) -> None:
        return None

    def peft_name_of(self, lease: Lease) -> str | None:
        return None


def demo_passages() -> list[Passage]:
    out = []
    with Path("index/sources/demo.jsonl").open(encoding="utf-8") as source:
        for line in source:
            doc = json.loads(line)
            words = doc["text"].split()[:60]  # about the size of one retrieved chunk
            out.append(Passage(f"{doc['id']}#0", doc["id"], doc["title"], " ".join(words)))
    return out


def workload(
    n: int, top_k: int, tokens: int, mix: Sequence[Mode], seed: int
) -> list[EngineRequest]:
    rng = random.Random(seed)
    passages = demo_passages()
    reqs = []
    for i in range(n):
        chosen = rng.sample(passages, top_k)
        scores = sorted((rng.uniform(0, 3) for _ in chosen), reverse=True)
        mode = mix[i % len(mix)]
        question = f"What is {chosen[0].title}?"
        reqs.append(EngineRequest(question, chosen, None, tokens, mode, scores=scores))
    return reqs


async def serve(
    gen: Generator,
    reqs: list[EngineRequest],
    arrivals: list[float],
    *,
    joins: bool,
    batch: int,
    beams: int = 1,
) -> tuple[float, dict[str, list[float]]]:
    """Seconds from the first arrival to the last answer, and latencies per mode."""
    config = EngineConfig(max_batch_size=batch, batch_wait_ms=2, step_batching=joins)
    engine = Engine(StepBatch(gen, DecodingConfig(num_beams=beams)), NoAdapters(), config)
    engine.start()
    modes = [*dict.fromkeys(r.mode for r in reqs), "all"]
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    start = time.perf_counter()

    async def one(req: EngineRequest, at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        t0 = time.perf_counter()
        await engine.generate(req)
        latencies[req.mode].append(time.perf_counter() - t0)
        latencies["all"].append(time.perf_counter() - t0)

    await asyncio.gather(*(one(r, a) for r, a in zip(reqs, arrivals, strict=True)))
    wall = time.perf_counter() - start
    await engine.stop()
    return wall, latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second (Poisson)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mix", default="concat,token", help="modes, taking turns")
    ap.add_argument("--beams", type=int, default=1, help="num_beams of the RAG modes")
    args = ap.parse_args()
    mix = [cast(Mode, m) for m in args.mix.split(",")]
    if not set(mix) <= {"concat", "token", "sequence"}:
        ap.error(f"--mix: unknown mode in {args.mix!r}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = t5_small_shaped(Path(tmp) / "t5")
        gen = load_generator(str(model), cache_dir=Path(tmp))
    reqs = workload(args.requests, args.top_k, args.max_new_tokens, mix, seed=0)
    variants = {"steps": True, "whole": False}
    warm = reqs[:4]
    asyncio.run(serve(gen, warm, [0.0] * 4, joins=True, batch=args.batch, beams=args.beams))
    results: dict[str, list[tuple[float, dict[str, list[float]]]]] = {v: [] for v in variants}
    names = list(variants)
    for r in range(args.rounds):
        rng = random.Random(100 + r)
        gaps = [rng.expovariate(args.rate) for _ in reqs]
        arrivals = [sum(gaps[: i + 1]) - gaps[0] for i in range(len(gaps))]
        for name in names[r % 2 :] + names[: r % 2]:
            wall, lat = asyncio.run(
                serve(gen, reqs, arrivals, joins=variants[name], batch=args.batch, beams=args.beams)
            )
            results[name].append((wall, lat))
            print(
                f"round {r + 1} {name:5s}: {len(reqs) / wall:.2f} req/s; "
                + "; ".join(
                    f"{m} p50 {pct(v, 50):.2f} s p99 {pct(v, 99):.2f} s" for m, v in lat.items()
                ),
                flush=True,
            )

    def med(name: str, mode: str, p: float) -> float:
        return statistics.median(pct(lat[mode], p) for _, lat in results[name])

    def rps(name: str) -> float:
        return statistics.median(len(reqs) / wall for wall, _ in results[name])

    print(
        f"requests={args.requests} rate={args.rate}/s top_k={args.top_k} "
        f"max_new_tokens={args.max_new_tokens} batch={args.batch} rounds={args.rounds} "
        f"mix={args.mix} beams={args.beams}"
    )
    modes = [*dict.fromkeys(mix), "all"]
    for name in names:
        print(
            f"{name:5s}: {rps(name):.2f} req/s; "
            + "; ".join(
                f"{m} p50 {med(name, m, 50):.2f} s p99 {med(name, m, 99):.2f} s" for m in modes
            )
        )
    for m in modes:
        print(
            f"steps/whole {m}: p50 {med('steps', m, 50) / med('whole', m, 50):.2f}x, "
            f"p99 {med('steps', m, 99) / med('whole', m, 99):.2f}x"
        )
    print(f"steps/whole throughput: {rps('steps') / rps('whole'):.2f}x")


if __name__ == "__main__":
    main()
