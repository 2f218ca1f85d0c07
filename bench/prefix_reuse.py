"""The prompt-prefix KV cache on skewed and on unrepeated traffic, through the engine.

The real default generator (SmolLM2-135M-Instruct) and demo index, in one process: --questions
questions over the demo corpus ("What is <title>?", "Where is ...", "Who ...", "When ..."),
retrieved with --top-k passages, concat mode, up to --max-new-tokens tokens, adapters taking
turns from --adapters (default: the base, concise, cited). Two workloads:
- zipf: --requests draws from the questions with probability ~ 1/rank^--zipf (popular questions
  and passages repeat, as in real traffic);
- unique: --requests distinct questions, nothing repeats (the cache never hits).
Each runs with the cache on and off, with --clients closed-loop clients and with one client
(one request at a time; --no-single leaves those out), the variants rotating per round.
--orders compares concat passage orders (LORAG_CONCAT_ORDER, app/generation/prompts.py): each
order runs with the cache on, and the cache-off arm once, in the first order (without the
cache both orders prefill the same tokens). Printed: throughput (requests/s) and its ratio to
one at a time, time to first token p50/p99, the share of prompt tokens reused; last, the
cache's ratios on/off and, with two orders, the second's against the first's, cache on.

    .venv/bin/python -m bench.prefix_reuse [--requests 48] [--clients 16] [--rounds 2]
    .venv/bin/python -m bench.prefix_reuse --requests 32 --rounds 1 --no-single \
        --orders score stable
    .venv/bin/python -m bench.prefix_reuse --requests 48 --rounds 1 --warm 200

--one-call adds a cache-on arm at --clients on the Zipf traffic whose joiners at a step
boundary prefill in one call, as before the engine prefilled prefix-cache hits first
(app/engine/session.cheap_first): what that ordering does to time to first token.
--workloads runs some of the two only.

--whole adds a cache-on arm at --clients on the Zipf traffic whose blocks are kept whole per
adapter, as before the cache shared the layers below the adapters' across them
(app/generation/prefix_cache.py, "Across adapters"): what that sharing does.

--prefill-dtypes model bfloat16 runs every arm in each (LORAG_PREFILL_DTYPE: prefill calls in
bfloat16 under autocast, decoding in float32), rotating with the others; each dtype's ratios are
against its own one-at-a-time arms, and last come bfloat16's against the model dtype's.

--warm N serves N other draws of the same traffic first, untimed, on each cache-on arm's engine:
the steady state of a server that has been answering it (a fresh cache per arm otherwise sees
only the repeats inside --requests, 21% of prompt tokens at 32 requests against 56% counted
over 300: bench/RESULTS.md), with 16 clients whatever the arm's. Cache-off arms and the unique
workload are not warmed (nothing would carry over).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

from app.contracts import Hit
from app.engine import session
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.requests import EngineRequest, Observers
from app.generation.config import (
    CONCAT_ORDERS,
    PREFILL_DTYPES,
    ConcatOrder,
    DecodingConfig,
    PrefillDType,
)
from app.generation.step_batch import StepBatch
from app.settings import Settings
from app.wiring import Components, load_components
from bench.serve_throughput import pct

# workload, concat order, cache on, clients, how ("": as served; "one call": joiners at a step
# boundary in one call, no hits first; "whole": blocks kept whole per adapter), prefill dtype
Variant = tuple[str, ConcatOrder, bool, int, str, PrefillDType]
WARM_CLIENTS = 16
PATTERNS = ("What is {}?", "Where is {} found?", "Who is known for {}?", "When did {} begin?")


def question_set(n: int) -> list[str]:
    with Path("index/sources/demo.jsonl").open(encoding="utf-8") as source:
        titles = [json.loads(line)["title"] for line in source]
    out = [p.format(t) for p in PATTERNS for t in titles]
    return out[:n]


def draws(questions: list[str], n: int, zipf: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** zipf for rank in range(len(questions))]
    return rng.choices(questions, weights=weights, k=n)


async def serve(
    parts: Components,
    reqs: list[tuple[EngineRequest, str | None]],
    clients: int,
    cache_bytes: int,
    warm: list[tuple[EngineRequest, str | None]] | None = None,
    how: str = "",
    prefill: PrefillDType = "model",
) -> tuple[float, list[float], int, int]:
    """(seconds for all requests, time to first token each, prompt tokens, reused tokens).
    `warm`: requests served first, untimed and uncounted, on the same engine and cache (a
    server that has been answering this traffic for a while). how "one call": each step
    boundary's joiners prefill in one call (the engine before session.cheap_first); "whole":
    the cache keeps blocks whole per adapter (before blocks were shared across adapters)."""
    ordering, split = session.cheap_first, StepBatch._split
    if how == "one call":
        session.cheap_first = lambda joiners, costs: [joiners] if joiners else []
    if how == "whole":
        StepBatch._split = lambda self: (0, 0)  # type: ignore[method-assign]
    try:
        return await _serve(parts, reqs, clients, cache_bytes, warm, prefill)
    finally:
        session.cheap_first, StepBatch._split = ordering, split  # type: ignore[method-assign]


async def _serve(
    parts: Components,
    reqs: list[tuple[EngineRequest, str | None]],
    clients: int,
    cache_bytes: int,
    warm: list[tuple[EngineRequest, str | None]] | None,
    prefill: PrefillDType,
) -> tuple[float, list[float], int, int]:
    ttft: list[float] = []
    decoding = DecodingConfig(prefix_cache_bytes=cache_bytes, prefill_dtype=prefill)
    stepper = StepBatch(parts.generator, decoding)
    config = EngineConfig(max_batch_size=16, batch_wait_ms=5, prefill_tokens_per_step=1024)
    engine = Engine(stepper, parts.registry, config, Observers(on_first_token=ttft.append))
    engine.start()
    prompt = reused = 0
    queue = list(warm or [])

    async def client() -> None:
        nonlocal prompt, reused
        while queue:
            req, name = queue.pop(0)
            lease = parts.registry.acquire(name) if name else None
            try:
                result = await engine.generate(replace(req, adapter=name, lease=lease))
            finally:
                if lease is not None:
                    parts.registry.release(lease)
            prompt += result.answer.prompt_tokens
            reused += result.answer.reused_tokens

    if queue:  # untimed: as many clients as the timed 16-client arm, so it is quick
        await asyncio.gather(*(client() for _ in range(WARM_CLIENTS)))
        ttft.clear()
        prompt = reused = 0
    queue = list(reqs)
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    await engine.stop()
    return wall, ttft, prompt, reused


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--adapters", default=",concise,cited", help="names taking turns; '': base")
    ap.add_argument("--cache-mib", type=int, default=256)
    ap.add_argument("--orders", nargs="+", choices=CONCAT_ORDERS, help="default: the setting's")
    ap.add_argument("--no-single", action="store_true", help="leave out one at a time")
    ap.add_argument(
        "--workloads", nargs="+", choices=("zipf", "unique"), default=["zipf", "unique"]
    )
    ap.add_argument("--one-call", action="store_true", help="add a Zipf arm without hits first")
    ap.add_argument("--whole", action="store_true", help="add a Zipf arm with whole blocks")
    ap.add_argument(
        "--prefill-dtypes", nargs="+", choices=PREFILL_DTYPES, help="default: the setting's"
    )
    ap.add_argument(
        "--warm",
        type=int,
        default=0,
        help="zipf requests (other draws, same distribution) served untimed first, cache on",
    )
    args = ap.parse_args()
    settings = Settings()
    orders: list[ConcatOrder] = args.orders or [settings.concat_order]
    dtypes: list[PrefillDType] = args.prefill_dtypes or [settings.prefill_dtype]
    parts = load_components(settings)
    names = [a or None for a in args.adapters.split(",")]
    for name in {n for n in names if n}:
        if name not in parts.registry:
            parts.registry.install(name, parts.registry.prepare(name))
    questions = question_set(args.questions)
    workloads = {
        "zipf": draws(questions, args.requests, args.zipf, seed=0),
        "unique": random.Random(1).sample(questions, args.requests),
    }
    workloads = {w: qs for w, qs in workloads.items() if w in args.workloads}

    def requests(qs: list[str]) -> list[tuple[EngineRequest, str | None]]:
        hits: list[list[Hit]] = parts.retriever.retrieve(qs, args.top_k)
        return [
            (
                EngineRequest(q, [h.passage for h in hs], None, args.max_new_tokens),
                names[i % len(names)],
            )
            for i, (q, hs) in enumerate(zip(qs, hits, strict=True))
        ]

    reqs = {w: requests(qs) for w, qs in workloads.items()}
    # a server in steady state: it has answered --warm earlier requests of the same traffic.
    # Not the unique workload: nothing in it repeats, and what a warm cache would hold for it
    # (the system prompt) the timed run caches at its first request
    warm = {"zipf": requests(draws(questions, args.warm, args.zipf, seed=2)), "unique": []}
    n, base = args.clients, orders[0]
    clients = [args.clients] if args.no_single else [args.clients, 1]
    variants: list[Variant] = [
        (w, o, on, c, "", d)
        for d in dtypes
        for w in workloads
        for o in orders
        for on in (True, False)
        if on or o == orders[0]
        for c in clients
    ]
    one_call: Variant = ("zipf", base, True, n, "one call", dtypes[0])
    whole: Variant = ("zipf", base, True, n, "whole", dtypes[0])
    if args.one_call and "zipf" in workloads:
        variants.append(one_call)
    if args.whole and "zipf" in workloads:
        variants.append(whole)
    results: dict[Variant, list[tuple[float, list[float], int, int]]] = {v: [] for v in variants}
    asyncio.run(serve(parts, next(iter(reqs.values()))[:2], 2, 0))  # warm-up
    for r in range(args.rounds):
        rotated = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in rotated:
            w, o, on, c, how, d = v
            # the one prompt builder's layout, per arm; each arm has a fresh cache (serve)
            parts.generator.prompts.order = o
            cache = args.cache_mib * 1024 * 1024 if on else 0
            out = asyncio.run(serve(parts, reqs[w], c, cache, warm[w] if on else None, how, d))
            results[v].append(out)
            wall, firsts, prompt, reused = out
            print(
                f"round {r + 1} {w:6s} {o:6s} {d:8s} {label(v)} clients {c:2d}: "
                f"{args.requests / wall:.3f} req/s, ttft p50 {pct(firsts, 50):.2f} s "
                f"p99 {pct(firsts, 99):.2f} s, reused {reused / max(prompt, 1):.0%}",
                flush=True,
            )

    def rps(v: Variant) -> float:
        return statistics.median(args.requests / wall for wall, *_ in results[v])

    def first(v: Variant, p: float) -> float:
        return statistics.median(pct(t, p) for _, t, *_ in results[v])

    def share(v: Variant) -> float:
        return statistics.median(reused / max(prompt, 1) for *_, prompt, reused in results[v])

    print(
        f"requests={args.requests} clients={args.clients} top_k={args.top_k} "
        f"max_new_tokens={args.max_new_tokens} zipf={args.zipf} adapters={args.adapters!r} "
        f"rounds={args.rounds} orders={','.join(orders)} warm={args.warm} "
        f"prefill={','.join(dtypes)}"
    )
    for v in (v for v in variants if v[3] == n):
        w, o, on, _, _, d = v
        single = (
            ""
            if args.no_single
            else f" = {rps(v) / rps((w, base, False, 1, '', d)):.2f}x one at a time without "
            f"the cache ({rps(v) / rps((w, o, on, 1, '', d)):.2f}x with it)"
        )
        print(
            f"{w:6s} {o:6s} {d:8s} {label(v)}: {rps(v):.3f} req/s{single}; "
            f"ttft p50 {first(v, 50):.2f} s p99 {first(v, 99):.2f} s; reused {share(v):.0%}"
        )
    for other, name in ((one_call, "hits first / one call"), (whole, "shared / whole blocks")):
        if other in results:
            a = ("zipf", base, True, n, "", dtypes[0])
            print(
                f"zipf {name}, cache on: throughput {rps(a) / rps(other):.2f}x, "
                f"ttft p50 {first(a, 50) / first(other, 50):.2f}x, "
                f"p99 {first(a, 99) / first(other, 99):.2f}x, reused {share(a):.0%} against "
                f"{share(other):.0%}"
            )
    for w, d in ((w, d) for d in dtypes for w in workloads):
        no = (w, base, False, n, "", d)
        for o in orders:
            yes = (w, o, True, n, "", d)
            print(
                f"{w} {o} {d} on/off: throughput {rps(yes) / rps(no):.2f}x, "
                f"ttft p50 {first(yes, 50) / first(no, 50):.2f}x, "
                f"p99 {first(yes, 99) / first(no, 99):.2f}x"
            )
        for o in orders[1:]:
            a, b = (w, base, True, n, "", d), (w, o, True, n, "", d)
            print(
                f"{w} {o}/{base}, cache on: throughput {rps(b) / rps(a):.2f}x, "
                f"ttft p50 {first(b, 50) / first(a, 50):.2f}x, reused {share(b):.0%} against "
                f"{share(a):.0%}"
            )

    if len(dtypes) > 1:  # the second dtype against the first, arm by arm
        for w in workloads:
            for on, c in ((True, n), (False, n), (False, 1)):
                if args.no_single and c == 1:
                    continue
                a, b = (w, base, on, c, "", dtypes[0]), (w, base, on, c, "", dtypes[1])
                print(
                    f"{w} {dtypes[1]}/{dtypes[0]}, {label(a)} clients {c:2d}: throughput "
                    f"{rps(b) / rps(a):.2f}x, ttft p50 {first(b, 50) / first(a, 50):.2f}x"
                )


def label(v: Variant) -> str:
    """'cache on', 'cache off', 'one call' (cache on, joiners in one call) or 'whole' (cache
    on, blocks whole per adapter)."""
    if v[4]:
        return f"{v[4]:9s}"
    return "cache on " if v[2] else "cache off"


if __name__ == "__main__":
    main()
