"""float32 against bfloat16 for the default generator on this CPU (LORAG_DTYPE).

Two parts, both on the real SmolLM2-135M-Instruct and demo index:
- speed: one prefill of a demo concat prompt (top_k 5, ~750 tokens) and one decoding step of 16
  rows over it, in each dtype, --rounds rounds alternating float32 and bfloat16, medians;
- answers: --requests Zipf demo requests (bench/prefix_reuse.py's, mixed adapters, top_k 3, 16
  new tokens) one at a time in each dtype, cache off, then with the prefix cache on (a second
  pass, so they hit): how many answers bfloat16 leaves unchanged, and whether the cache keeps
  every answer exact in each dtype.

    .venv/bin/python -m bench.dtype [--rounds 5] [--requests 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from app.contracts import GenRow
from app.generation.config import DecodingConfig
from app.generation.modes.base import Answer
from app.generation.step_batch import StepBatch
from app.settings import Settings
from app.wiring import Components, load_components
from bench.prefix_reuse import draws, question_set

DTYPES = ("float32", "bfloat16")
ADAPTERS = (None, "concise", "cited")


def one_at_a_time(batch: StepBatch, rows: list[GenRow]) -> list[Answer]:
    out = []
    for row in rows:
        done = dict(batch.join([row], [0]))
        while len(batch):
            done.update(batch.step())
        out.append(done[0])
    return out


def timings(parts: Components, prompt: list[int]) -> tuple[float, float]:
    """Seconds of one prefill of prompt and of one decoding step of 16 rows after it."""
    model = parts.generator.model
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t
        cache = out.past_key_values
        cache.batch_repeat_interleave(16)
        step = torch.full((16, 1), int(prompt[-1]))
        t = time.perf_counter()
        model(step, past_key_values=cache, use_cache=True)
        decode = time.perf_counter() - t
    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=48)
    args = ap.parse_args()
    parts = {d: load_components(Settings(dtype=d)) for d in DTYPES}
    for p in parts.values():
        for name in ADAPTERS[1:]:
            if name not in p.registry:
                p.registry.install(name, p.registry.prepare(name))
    first = parts["float32"]
    question = "What is the capital of Alaska?"
    hits = first.retriever.retrieve([question], 5)[0]
    prompt = first.generator.concat_prompt(GenRow(question, [h.passage for h in hits], None, 16))
    times: dict[str, list[tuple[float, float]]] = {d: [] for d in DTYPES}
    for d in DTYPES:
        timings(parts[d], prompt)  # warm-up
    for _ in range(args.rounds):
        for d in DTYPES:
            times[d].append(timings(parts[d], prompt))

    qs = draws(question_set(300), args.requests, 1.1, seed=0)
    found = first.retriever.retrieve(qs, 3)
    answers: dict[str, list[Answer]] = {}
    for d in DTYPES:
        p = parts[d]
        rows = [
            GenRow(q, [h.passage for h in hs], p.registry.peft_name(a) if a else None, 16)
            for q, hs, a in zip(qs, found, [ADAPTERS[i % 3] for i in range(len(qs))], strict=True)
        ]
        t = time.perf_counter()
        off = one_at_a_time(StepBatch(p.generator, DecodingConfig(prefix_cache_bytes=0)), rows)
        seconds = time.perf_counter() - t
        cached = StepBatch(p.generator, DecodingConfig(prefix_cache_bytes=3 << 30))
        one_at_a_time(cached, rows)
        on = one_at_a_time(cached, rows)
        exact = sum(a.ids == b.ids for a, b in zip(off, on, strict=True))
        reused = sum(a.reused_tokens for a in on) / sum(a.prompt_tokens for a in on)
        print(
            f"{d:8s}: {len(rows)} requests one at a time in {seconds:.1f} s; cache on == off "
            f"{exact}/{len(rows)} (second pass reused {reused:.0%})"
        )
        answers[d] = off
    same = sum(a.text == b.text for a, b in zip(*answers.values(), strict=True))
    print(f"bfloat16 answers equal to float32's: {same}/{args.requests}")
    print(f"prompt {len(prompt)} tokens, {args.rounds} rounds, medians:")
    medians = {d: [statistics.median(t[i] for t in times[d]) for i in (0, 1)] for d in DTYPES}
    for d, (pre, dec) in medians.items():
        print(f"{d:8s}: prefill {pre * 1000:.0f} ms, decoding step (16 rows) {dec * 1000:.1f} ms")
    (pre16, dec16), (pre32, dec32) = medians["bfloat16"], medians["float32"]
    print(f"bfloat16/float32: prefill {pre16 / pre32:.2f}x, decoding step {dec16 / dec32:.2f}x")


if __name__ == "__main__":
    main()
