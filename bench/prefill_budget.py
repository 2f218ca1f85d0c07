"""The prefill budget (LORAG_PREFILL_TOKENS_PER_STEP): how long a burst of arrivals pauses the
answers already decoding, and what it costs the arrivals.

The engine in one process with the real default generator (SmolLM2-135M-Instruct) and its
StepBatch, concat mode, --top-k demo passages per question (the demo index's retrieval is not
run: each question gets the passages of its own demo document and its neighbours), up to
--max-new-tokens tokens. Each run: --running requests start together; --after seconds later a
burst of --burst requests arrives at once. Measured while the first requests still decode: the
gaps between consecutive decoding steps (the time between two tokens of a running answer; a
step boundary that prefills joiners makes a long gap); and for the burst, the time from arrival
to the answer. Variants: budgets from --budgets (0 = no limit, the behaviour before it),
rotating each round; medians over --rounds.

    .venv/bin/python -m bench.prefill_budget [--budgets 0 2048] [--rounds 2] [--burst 12]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from collections.abc import Callable

import torch

from app.contracts import Passage
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.requests import EngineRequest
from app.generation.generator import Generator
from app.generation.step_batch import Finished, StepBatch
from app.settings import Settings
from app.wiring import load_components
from bench.rag_steps import NoAdapters, demo_passages
from bench.serve_throughput import pct
from bench.step_batching import questions


def requests(n: int, start: int, top_k: int, tokens: int) -> list[EngineRequest]:
    passages: list[Passage] = demo_passages()
    qs = questions()
    out = []
    for i in range(start, start + n):
        chosen = [passages[(i + j) % len(passages)] for j in range(top_k)]
        out.append(EngineRequest(qs[i % len(qs)], chosen, None, tokens, "concat"))
    return out


async def run(
    gen: Generator, args: argparse.Namespace, budget: int
) -> tuple[list[float], list[float]]:
    """(gaps between decoding steps while the first requests decode, burst latencies)."""
    stepper = StepBatch(gen)
    config = EngineConfig(
        max_batch_size=args.running + args.burst, batch_wait_ms=2, prefill_tokens_per_step=budget
    )
    engine = Engine(stepper, NoAdapters(), config)
    steps: list[float] = []
    step = stepper.step

    def timed() -> list[Finished]:
        out = step()
        steps.append(time.perf_counter())
        return out

    stepper.step = timed  # type: ignore[method-assign]
    engine.start()
    first = requests(args.running, 0, args.top_k, args.max_new_tokens)
    burst = requests(args.burst, args.running, args.top_k, args.max_new_tokens)
    first_done: list[float] = []
    burst_latency: list[float] = []

    async def one(req: EngineRequest, delay: float, sink: list[float], since: bool) -> None:
        await asyncio.sleep(delay)
        t0 = time.perf_counter()
        await engine.generate(req)
        sink.append(time.perf_counter() - t0 if since else time.perf_counter())

    await asyncio.gather(
        *(one(r, 0.0, first_done, False) for r in first),
        *(one(r, args.after, burst_latency, True) for r in burst),
    )
    await engine.stop()
    end = max(first_done)
    ticks = [t for t in steps if t <= end]
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    return gaps, burst_latency


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 2048])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--running", type=int, default=4)
    ap.add_argument("--burst", type=int, default=12)
    ap.add_argument("--after", type=float, default=2.0, help="seconds before the burst")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    gen = load_components(Settings()).generator
    results: dict[int, list[tuple[list[float], list[float]]]] = {b: [] for b in args.budgets}
    asyncio.run(run(gen, argparse.Namespace(**{**vars(args), "burst": 1, "running": 1}), 0))
    for r in range(args.rounds):
        order = args.budgets[r % len(args.budgets) :] + args.budgets[: r % len(args.budgets)]
        for budget in order:
            gaps, lat = asyncio.run(run(gen, args, budget))
            results[budget].append((gaps, lat))
            print(
                f"round {r + 1} budget {budget}: step gap p50 {pct(gaps, 50):.2f} s, "
                f"max {max(gaps):.2f} s; burst latency p50 {pct(lat, 50):.2f} s, "
                f"p99 {pct(lat, 99):.2f} s",
                flush=True,
            )
    print(
        f"running={args.running} burst={args.burst} top_k={args.top_k} "
        f"max_new_tokens={args.max_new_tokens} rounds={args.rounds} "
        f"threads={torch.get_num_threads()}"
    )

    def med(budget: int, f: Callable[[list[float], list[float]], float]) -> float:
        return statistics.median(f(g, lat) for g, lat in results[budget])

    for budget in args.budgets:
        print(
            f"budget {budget:>5}: step gap p50 {med(budget, lambda g, _: pct(g, 50)):.2f} s, "
            f"p99 {med(budget, lambda g, _: pct(g, 99)):.2f} s, "
            f"max {med(budget, lambda g, _: max(g)):.2f} s; burst latency p50 "
            f"{med(budget, lambda _, lat: pct(lat, 50)):.2f} s, "
            f"p99 {med(budget, lambda _, lat: pct(lat, 99)):.2f} s"
        )

    def longest(g: list[float], _: list[float]) -> float:
        return max(g)

    def burst_p50(_: list[float], lat: list[float]) -> float:
        return pct(lat, 50)

    base = args.budgets[0]
    for budget in args.budgets[1:]:
        print(
            f"budget {budget} / {base}: longest pause between two tokens "
            f"{med(budget, longest) / med(base, longest):.2f}x, "
            f"burst latency p50 {med(budget, burst_p50) / med(base, burst_p50):.2f}x"
        )


if __name__ == "__main__":
    main()
