"""What step-level (continuous) batching could win: decoding steps spent on finished rows.

A batch generated to completion runs until its longest answer ends; a row that ended earlier
is carried (its steps computed and thrown away) until then, and a request that arrives
meanwhile waits for the whole batch. Step-level scheduling would hand the finished rows' slots
to waiting requests at once. This measures the first effect on the real default generator
(SmolLM2-135M-Instruct) answering demo questions in concat mode with top_k passages, the way
the server does: batches of --batch questions, each row's generated tokens (end token
included, app.generation.step_batch.Decoded.tokens) against the steps its batch ran. The
questions: the 5 of index/sources/demo_questions.json, then "What is <title>?" for the demo
corpus's articles in order.

    .venv/bin/python -m bench.decode_waste [--batch 16] [--batches 2] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from app.contracts import GenRow
from app.settings import Settings
from app.wiring import load_components
from bench.step_batching import questions as demo_questions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = Settings()
    parts = load_components(settings)
    questions = demo_questions()
    used, run = 0, 0
    lengths: list[int] = []
    for b in range(args.batches):
        chunk = questions[b * args.batch : (b + 1) * args.batch]
        hits = parts.retriever.retrieve(chunk, args.top_k)
        rows = [
            GenRow(q, [h.passage for h in hs], None, args.max_new_tokens)
            for q, hs in zip(chunk, hits, strict=True)
        ]
        t = time.perf_counter()
        decoded = parts.generator.generate_whole(rows)  # each batch to its longest answer
        seconds = time.perf_counter() - t
        tokens = [d.tokens for d in decoded]
        lengths += tokens
        used += sum(tokens)
        run += len(tokens) * max(tokens)
        print(f"batch {b}: {len(rows)} rows, {seconds:.1f} s, tokens per row {sorted(tokens)}")
    print(f"answer length: median {statistics.median(lengths)}, max {max(lengths)} tokens")
    print(f"row-steps that produced a token: {used} of {run} ({100 * used / run:.0f}%)")
    print(f"row-steps spent on finished rows: {100 * (1 - used / run):.0f}%")


if __name__ == "__main__":
    main()
