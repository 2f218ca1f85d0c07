"""float32 against bfloat16 for the default generator on this CPU: the whole model in bfloat16
(LORAG_DTYPE), and a float32 model whose prefill calls run under bfloat16 autocast while it
decodes in float32 (LORAG_PREFILL_DTYPE=bfloat16, "prefill16" below).

Two parts, both on the real SmolLM2-135M-Instruct and demo index:
- speed: one prefill of a demo concat prompt (top_k 5, ~750 tokens) and one decoding step of 16
  rows over it, in each arm, --rounds rounds alternating the arms, medians;
- answers: --requests Zipf demo requests (bench/prefix_reuse.py's, mixed adapters, --top-k,
  --max-new-tokens) one at a time in each arm, cache off, then with the prefix cache on (a second
  pass, so they hit): how many answers each arm leaves unchanged against float32, and whether
  the cache keeps every answer exact in each.

    .venv/bin/python -m bench.dtype [--rounds 5] [--requests 48] [--top-k 3] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from app.contracts import GenRow
from app.generation.config import DecodingConfig, PrefillDType
from app.generation.modes.base import Answer
from app.generation.step_batch import StepBatch
from app.settings import Settings
from app.wiring import Components, load_components
from bench.prefix_reuse import draws, question_set

DTYPES = ("float32", "bfloat16")
ARMS = ("float32", "bfloat16", "prefill16")  # prefill16: float32, prefill under autocast
ADAPTERS = (None, "concise", "cited")


def one_at_a_time(batch: StepBatch, rows: list[GenRow]) -> list[Answer]:
    out = []
    for row in rows:
        done = dict(batch.join([row], [0]))
        while len(batch):
            done.update(batch.step())
        out.append(done[0])
    return out


def timings(parts: Components, prompt: list[int], autocast: bool = False) -> tuple[float, float]:
    """Seconds of one prefill of prompt (last position's logits, as the server's) and of one
    decoding step of 16 rows after it; autocast: the prefill under bfloat16 autocast."""
    model = parts.generator.model
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        if autocast:  # decoding reads float32 keys and values, as the step batch gives it
            for layer in out.past_key_values.layers:
                layer.keys, layer.values = layer.keys.float(), layer.values.float()
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
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
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
    model_of = {"float32": "float32", "bfloat16": "bfloat16", "prefill16": "float32"}
    times: dict[str, list[tuple[float, float]]] = {a: [] for a in ARMS}
    for a in ARMS:
        timings(parts[model_of[a]], prompt, a == "prefill16")  # warm-up
    for _ in range(args.rounds):
        for a in ARMS:
            times[a].append(timings(parts[model_of[a]], prompt, a == "prefill16"))

    qs = draws(question_set(300), args.requests, 1.1, seed=0)
    found = first.retriever.retrieve(qs, args.top_k)
    answers: dict[str, list[Answer]] = {}
    for arm in ARMS:
        p = parts[model_of[arm]]
        prefill: PrefillDType = "bfloat16" if arm == "prefill16" else "model"
        rows = [
            GenRow(
                q, [h.passage for h in hs], p.registry.peft_name(a) if a else None,
                args.max_new_tokens,
            )
            for q, hs, a in zip(qs, found, [ADAPTERS[i % 3] for i in range(len(qs))], strict=True)
        ]  # fmt: skip
        t = time.perf_counter()
        off = one_at_a_time(StepBatch(p.generator, DecodingConfig(prefill_dtype=prefill)), rows)
        seconds = time.perf_counter() - t
        on_config = DecodingConfig(prefix_cache_bytes=3 << 30, prefill_dtype=prefill)
        cached = StepBatch(p.generator, on_config)
        one_at_a_time(cached, rows)
        on = one_at_a_time(cached, rows)
        exact = sum(a.ids == b.ids for a, b in zip(off, on, strict=True))
        reused = sum(a.reused_tokens for a in on) / sum(a.prompt_tokens for a in on)
        print(
            f"{arm:9s}: {len(rows)} requests one at a time in {seconds:.1f} s; cache on == off "
            f"{exact}/{len(rows)} (second pass reused {reused:.0%})"
        )
        answers[arm] = off
    for arm in ARMS[1:]:
        same = sum(a.text == b.text for a, b in zip(answers[arm], answers["float32"], strict=True))
        print(f"{arm} answers equal to float32's: {same}/{args.requests}")
    print(f"prompt {len(prompt)} tokens, {args.rounds} rounds, medians:")
    medians = {a: [statistics.median(t[i] for t in times[a]) for i in (0, 1)] for a in ARMS}
    for a, (pre, dec) in medians.items():
        print(f"{a:9s}: prefill {pre * 1000:.0f} ms, decoding step (16 rows) {dec * 1000:.1f} ms")
    pre32, dec32 = medians["float32"]
    for a in ARMS[1:]:
        pre, dec = medians[a]
        print(f"{a}/float32: prefill {pre / pre32:.2f}x, decoding step {dec / dec32:.2f}x")


if __name__ == "__main__":
    main()
