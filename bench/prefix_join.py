"""Where the prefix cache's time goes with 16 clients: prefill and step seconds, cache on/off.

The same Zipf workload as bench/prefix_reuse.py (the real default generator and demo index,
concat mode, base adapter), through the engine with --clients closed-loop clients; the step
batch's prefill calls and decoding steps are timed. Cache on and off alternate (A B A B) for
--rounds rounds; medians, and the on/off ratios last.

    .venv/bin/python -m bench.prefix_join [--requests 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from app.engine.requests import EngineRequest
from app.generation import step_batch
from app.settings import Settings
from app.wiring import load_components
from bench.prefix_reuse import draws, question_set, serve

SPENT: dict[str, float] = {"prefill": 0.0, "step": 0.0}


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    args = ap.parse_args()
    step_batch.StepBatch._prefill = timed("prefill", step_batch.StepBatch._prefill)  # type: ignore[method-assign]
    step_batch.StepBatch.step = timed("step", step_batch.StepBatch.step)  # type: ignore[method-assign]
    parts = load_components(Settings())
    questions = draws(question_set(300), args.requests, args.zipf, seed=0)
    hits = parts.retriever.retrieve(questions, args.top_k)
    reqs: list[tuple[EngineRequest, str | None]] = [
        (EngineRequest(q, [h.passage for h in hs], None, args.max_new_tokens), None)
        for q, hs in zip(questions, hits, strict=True)
    ]
    asyncio.run(serve(parts, reqs[:2], 2, 0))  # warm-up
    got: dict[bool, list[tuple[float, float, float, float]]] = {True: [], False: []}
    for r in range(args.rounds):
        for on in (True, False):
            SPENT.update(prefill=0.0, step=0.0)
            wall, _, prompt, reused = asyncio.run(
                serve(parts, reqs, args.clients, 256 * 1024 * 1024 if on else 0)
            )
            got[on].append((wall, SPENT["prefill"], SPENT["step"], reused / max(prompt, 1)))
            print(
                f"round {r + 1} cache {'on ' if on else 'off'}: wall {wall:.1f} s, prefill "
                f"{SPENT['prefill']:.1f} s, steps {SPENT['step']:.1f} s, reused "
                f"{reused / max(prompt, 1):.0%}",
                flush=True,
            )

    def med(on: bool, i: int) -> float:
        return statistics.median(x[i] for x in got[on])

    print(
        f"requests={args.requests} clients={args.clients} top_k={args.top_k} "
        f"max_new_tokens={args.max_new_tokens} zipf={args.zipf} rounds={args.rounds}"
    )
    print(
        f"on/off: wall {med(True, 0) / med(False, 0):.2f}x, "
        f"prefill {med(True, 1) / med(False, 1):.2f}x, steps {med(True, 2) / med(False, 2):.2f}x"
    )


if __name__ == "__main__":
    main()
