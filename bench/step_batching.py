"""Step-level batching vs whole batches, in one process, on the real default generator.

The workload is the server's with a full queue: --requests demo questions (concat mode, top_k
passages retrieved from the demo index, up to --max-new-tokens answers, the default
SmolLM2-135M-Instruct), served with room for --batch rows at a time:
- whole: batches of --batch rows, each decoded to its longest answer by transformers' greedy
  generate() (Generator.generate_whole, the path of models with logits processors);
- step: one StepBatch (app/generation/step_batch.py); whenever rows finish, as many waiting rows
  join at the next step (what the engine does by default);
- closed: the StepBatch on whole's schedule (the next rows join only when the batch is empty:
  what the engine does with LORAG_STEP_BATCHING=false), so that step/closed is what refilling
  gives and closed/whole what the decoding loop itself and rows leaving early give;
- step_cat: step with transformers' DynamicLayer caches, which concatenate the whole cache at
  every step, instead of StepBatch's in-place appends.
The variants rotate for --rounds rounds (A B C, B C A, ...); tokens/s and the ratios to whole
are medians of the rounds. Every answer of `step` is checked to equal `whole`'s (greedy decoding;
exactness itself is tested in tests/test_stepping.py). Also printed: decoding steps run, and the
mean rows per step.

    .venv/bin/python -m bench.step_batching [--requests 48] [--batch 16] [--rounds 2]
        [--variants whole,step,closed]
    .venv/bin/python -m bench.step_batching --split [--rounds 3]
    .venv/bin/python -m bench.step_batching --adapters [--rounds 3]

--adapters: the shipped adapters (adapters/concise, adapters/cited: rank 8 on q, k, v, o) on
the step schedule, tokens/s with every row on one adapter and with rows alternating two, as a
ratio to the base. End tokens are ignored there, so that every row decodes exactly
--max-new-tokens tokens in every variant (the adapters change the answers, and their lengths).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any

import torch

from app.contracts import GenRow
from app.generation.generator import Generator
from app.generation.step_batch import Decoded, StepBatch
from app.settings import Settings
from app.wiring import load_components


def questions() -> list[str]:
    demo = json.loads(Path("index/sources/demo_questions.json").read_text())["questions"]
    out = [q["question"] for q in demo]
    with Path("index/sources/demo.jsonl").open(encoding="utf-8") as source:
        out += [f"What is {json.loads(line)['title']}?" for line in source]
    return out


def whole(gen: Generator, rows: list[GenRow], batch: int) -> tuple[list[Decoded], int, int]:
    """Answers, decoding steps and row-steps, batch by batch."""
    answers: list[Decoded] = []
    steps = row_steps = 0
    for i in range(0, len(rows), batch):
        done = gen.generate_whole(rows[i : i + batch])
        longest = max(d.tokens for d in done)
        steps += longest
        row_steps += longest * len(done)
        answers += done
    return answers, steps, row_steps


def stepped(
    gen: Generator, rows: list[GenRow], batch: int, *, refill: bool = True, in_place: bool = True
) -> tuple[list[Decoded], int, int]:
    """Answers, decoding steps (prefill counted as one) and row-steps, refilling as rows end
    (or, without refill, only once the batch is empty: whole's schedule, finished rows leaving)."""
    stepper = StepBatch(gen, in_place_cache=in_place)
    waiting = deque(range(len(rows)))
    answers: dict[object, Decoded] = {}
    steps = row_steps = 0
    while waiting or len(stepper):
        room = batch - len(stepper) if refill or not len(stepper) else 0
        joining = [waiting.popleft() for _ in range(min(len(waiting), room))]
        done = []
        if joining:
            done += stepper.join([rows[i] for i in joining], joining)
            steps += 1
            row_steps += len(joining)
        if len(stepper):
            row_steps += len(stepper)
            steps += 1
            done += stepper.step()
        answers.update((key, Decoded(a.text, a.tokens)) for key, a in done)
    return [answers[i] for i in range(len(rows))], steps, row_steps


def split(gen: Generator, rows: list[GenRow], batch: int, rounds: int, tokens: float) -> None:
    """Where a request's time goes, alone and in a full batch: prefill per row, and a decoding
    step for 1 row and for `batch` rows (medians over rounds); then the throughput that perfect
    batching could reach over serving one request at a time, for this workload's mean answer."""
    prefill: list[float] = []
    step1: list[float] = []
    step_n: list[float] = []
    for r in range(rounds):
        for size, times in ((1, step1), (batch, step_n)):
            stepper = StepBatch(gen)
            chunk = [rows[(r * batch + i) % len(rows)] for i in range(size)]
            fixed = [GenRow(x.question, x.passages, None, 10_000) for x in chunk]
            t = time.perf_counter()
            stepper.join(fixed, list(range(size)))
            if size == 1:
                prefill.append(time.perf_counter() - t)
            for _ in range(4):
                t = time.perf_counter()
                stepper.step()
                times.append(time.perf_counter() - t)
            stepper.clear()
    p, d1, dn = statistics.median(prefill), statistics.median(step1), statistics.median(step_n)
    print(f"prefill of one row: {p * 1000:.0f} ms; a decoding step: {d1 * 1000:.0f} ms for 1 row,")
    print(f"{dn * 1000:.0f} ms for {batch} rows ({dn / batch * 1000:.1f} ms per row)")
    alone = p + tokens * d1
    batched = p + tokens * dn / batch
    print(f"per request with ~{tokens:.0f} tokens: {alone:.2f} s alone, {batched:.2f} s batched")
    print(f"batching ceiling for this workload (prefill cannot be shared): {alone / batched:.2f}x")


def adapter_ratios(parts: Any, rows: list[GenRow], batch: int, rounds: int) -> None:
    """Per-row LoRA through the engine's path: the step schedule with every row on the base,
    every row on the shipped `concise` adapter, and rows alternating `concise` and `cited`
    (stacked per-row LoRA, app/lora/batched.py); tokens/s as a ratio to the base, per round."""
    registry = parts.registry
    names = {}
    for name in ("concise", "cited"):
        if name not in registry:
            registry.install(name, registry.prepare(name))
        names[name] = registry.peft_name(name)
    gen = parts.generator
    gen.eos_ids = set()  # every row decodes exactly max_new_tokens: the same work per variant

    def on(adapters: list[str | None]) -> list[GenRow]:
        return [
            GenRow(r.question, r.passages, adapters[i % len(adapters)], r.max_new_tokens)
            for i, r in enumerate(rows)
        ]

    variants = {
        "base": on([None]),
        "one": on([names["concise"]]),
        "two": on([names["concise"], names["cited"]]),
    }
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(rounds):
        order = list(variants)[rnd % 3 :] + list(variants)[: rnd % 3]
        for name in order:
            t = time.perf_counter()
            answers, steps, _ = stepped(gen, variants[name], batch)
            seconds = time.perf_counter() - t
            tokens = sum(d.tokens for d in answers)
            rates[name].append(tokens / seconds)
            print(f"round {rnd} {name:4s}: {seconds:6.1f} s  {tokens} tokens  {steps} steps")
    for name in ("one", "two"):
        per_round = [x / b for x, b in zip(rates[name], rates["base"], strict=True)]
        rounds_txt = ", ".join(f"{r:.3f}" for r in per_round)
        print(f"tokens/s {name}/base: {statistics.median(per_round):.3f} ({rounds_txt})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--variants", default="whole,step,closed")
    ap.add_argument("--split", action="store_true", help="only the prefill/decode split")
    ap.add_argument("--adapters", action="store_true", help="only per-row LoRA vs the base")
    ap.add_argument(
        "--answer-tokens",
        type=float,
        default=42.2,
        help="mean answer length for --split (the workload's: 2,027 tokens over 48 answers)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = load_components(Settings())
    gen = parts.generator
    qs = questions()[: args.requests]
    hits = parts.retriever.retrieve(qs, args.top_k)
    rows = [
        GenRow(q, [h.passage for h in hs], None, args.max_new_tokens)
        for q, hs in zip(qs, hits, strict=True)
    ]
    if args.split:
        split(gen, rows, args.batch, args.rounds, args.answer_tokens)
        return
    if args.adapters:
        adapter_ratios(parts, rows, args.batch, args.rounds)
        return
    variants: dict[str, Any] = {
        "whole": whole,
        "step": stepped,
        "closed": partial(stepped, refill=False),
        "step_cat": partial(stepped, in_place=False),
    }
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    rates: dict[str, list[float]] = {v: [] for v in variants}
    reference: list[Decoded] | None = None
    mismatches = 0
    for rnd in range(args.rounds):
        names = list(variants)
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            t = time.perf_counter()
            answers, steps, row_steps = variants[name](gen, rows, args.batch)
            seconds = time.perf_counter() - t
            tokens = sum(d.tokens for d in answers)
            rates[name].append(tokens / seconds)
            if reference is None:
                reference = answers
            else:
                mismatches += sum(a != b for a, b in zip(answers, reference, strict=True))
            print(
                f"round {rnd} {name:6s}: {seconds:6.1f} s  {tokens / seconds:6.1f} tok/s  "
                f"{tokens} tokens  {steps} steps  {row_steps / max(1, steps):4.1f} rows/step",
                flush=True,
            )
    for name in variants:
        print(f"{name:6s}: median {statistics.median(rates[name]):6.1f} tok/s")
    print(f"answers differing between the variants: {mismatches}")
    pairs = [("closed", "whole"), ("step", "whole"), ("step", "step_cat")]
    for a, b in [(a, b) for a, b in pairs if a in variants and b in variants]:
        per_round = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in per_round)
        print(f"throughput ratio {a}/{b}: {statistics.median(per_round):.2f}x ({rounds})")


if __name__ == "__main__":
    main()
