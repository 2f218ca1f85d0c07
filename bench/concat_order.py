"""What a concat passage order can give the prefix cache, counted without timing anything.

The real default generator's tokenizer and prompt builder, the demo index: each question's
concat prompt (top_k passages) is built in each order (LORAG_CONCAT_ORDER: score, stable), and
the prompts are fed one after another to an unbounded cache that counts as the step batch's
does (app/generation/prefix_cache.py: blocks of BLOCK tokens keyed by adapter and every token
before, a prompt reusing its leading cached blocks, never its last token). Printed per workload
and order: the share of prompt tokens reused, and the share of the prompts' passage tokens that
some earlier prompt also held (the most any order could reuse). Deterministic, so it needs no
quiet machine; bench/prefix_reuse.py --orders times the same on the engine.

Workloads, --requests draws each (bench/prefix_reuse.py's questions, "What is <title>?",
"Where is <title> found?", ...):
- zipf: prefix_reuse's skew, over its question list (each phrasing of every title in turn), so
  popular questions are mostly distinct titles, and a repeat is the same question again;
- topics: the same skew over titles, each draw asking about its title in one of the phrasings
  at random: popular topics asked in different words, whose passage sets overlap;
- unique: distinct questions, nothing repeats.

    .venv/bin/python -m bench.concat_order [--requests 300] [--top-k 3 5] [--adapters '']
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from app.contracts import GenRow
from app.generation.config import CONCAT_ORDERS
from app.generation.prefix_cache import BLOCK
from app.settings import Settings
from app.wiring import load_components
from bench.prefix_reuse import PATTERNS, draws, question_set


def titles() -> list[str]:
    with Path("index/sources/demo.jsonl").open(encoding="utf-8") as source:
        return [json.loads(line)["title"] for line in source]


def topic_draws(n: int, zipf: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    ts = titles()
    weights = [1.0 / (rank + 1) ** zipf for rank in range(len(ts))]
    return [rng.choice(PATTERNS).format(t) for t in rng.choices(ts, weights=weights, k=n)]


def reused(prompts: list[tuple[str | None, list[int]]]) -> int:
    """Tokens an unbounded block cache reuses when the prompts come one after another."""
    seen: set[tuple[str | None, tuple[int, ...]]] = set()
    total = 0
    for adapter, ids in prompts:
        ends = range(BLOCK, len(ids), BLOCK)  # full blocks, the last token always computed
        hit = 0
        for end in ends:
            if (adapter, tuple(ids[:end])) not in seen:
                break
            hit = end
        total += hit
        seen.update((adapter, tuple(ids[:end])) for end in ends)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--top-k", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--adapters", default=",concise,cited", help="names taking turns; '': base")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    parts = load_components(Settings())
    gen = parts.generator
    names = [a or None for a in args.adapters.split(",")]
    questions = question_set(args.questions)
    workloads = {
        "zipf": draws(questions, args.requests, args.zipf, seed=0),
        "topics": topic_draws(args.requests, args.zipf, seed=0),
        "unique": random.Random(1).sample(questions, min(args.requests, len(questions))),
    }
    print(f"requests={args.requests} zipf={args.zipf} adapters={args.adapters!r} block={BLOCK}")
    for k in args.top_k:
        for w, qs in workloads.items():
            hits = parts.retriever.retrieve(qs, k)
            passages = [[h.passage for h in hs] for hs in hits]
            # passage tokens some earlier prompt under the same adapter also held
            held: set[tuple[str | None, str]] = set()
            repeat = total_passage = 0
            for i, ps in enumerate(passages):
                for p in ps:
                    n = gen.prompts.n_tokens(p.text)
                    total_passage += n
                    key = (names[i % len(names)], p.id)
                    repeat += n if key in held else 0
                    held.add(key)
            line = f"top_k {k} {w:6s}: passage tokens seen before {repeat / total_passage:.0%}"
            for order in CONCAT_ORDERS:
                gen.prompts.order = order
                prompts = [
                    (
                        names[i % len(names)],
                        gen.concat_prompt(GenRow(q, ps, None, args.max_new_tokens)),
                    )
                    for i, (q, ps) in enumerate(zip(qs, passages, strict=True))
                ]
                tokens = sum(len(ids) for _, ids in prompts)
                line += f"; {order} reuses {reused(prompts) / tokens:.1%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
