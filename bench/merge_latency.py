"""One adapter: latency of a request on the base, with the adapter unmerged, and merged.

The issue's third figure for a single-task deployment (LORAG_MERGE_SINGLE_ADAPTER): the LoRA
paper's claim is that merging W + BA removes the added latency. The model and adapter are
bench/lora_throughput.py's (T5-small shape, random weights, rank 8 on q, k, v, o, wi, wo),
greedy generate() of exactly 32 tokens for a 64-token prompt, batch 1 (one request: latency)
and 16. Variants, in rotating order each round (CPU time, one thread; ratios are medians of
per-round ratios):

- base: the plain transformers model;
- unmerged: the adapter applied per row through BatchedLora, the serving path;
- merged: PEFT's merge_adapter() (W += scale * B @ A), generated with no per-row adapters.

    .venv/bin/python -m bench.merge_latency [--rounds 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from app.lora.batched import BatchedLora
from bench.lora_throughput import build, fixed_length, plain_generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    plain, model = build(1)
    fast = BatchedLora(model)
    gen = torch.Generator().manual_seed(1)

    def call(batch: int, mode: str) -> Callable[[], torch.Tensor]:
        ids = torch.randint(2, 32000, (batch, args.prompt_len), generator=gen)
        kw = fixed_length(ids)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                if mode == "base":
                    return plain_generate(plain, kw)
                if mode == "unmerged":
                    model.unmerge_adapter()
                    with fast.rows(["a0"] * batch):
                        return model.generate(**kw)
                model.merge_adapter()  # idempotent while merged
                return model.generate(**kw)

        return run

    cases = {
        f"{mode}/b{b}": call(b, mode) for b in (1, 16) for mode in ("base", "unmerged", "merged")
    }
    for fn in cases.values():
        fn()  # warm-up
    model.unmerge_adapter()
    # the merge and unmerge themselves are timed apart: they happen once per switch, not per call
    t = time.perf_counter()
    model.merge_adapter()
    merge_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    model.unmerge_adapter()
    unmerge_ms = (time.perf_counter() - t) * 1000

    cpu: dict[str, list[float]] = {k: [] for k in cases}
    keys = list(cases)
    for r in range(args.rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            if key.startswith("unmerged") or key.startswith("base"):
                model.unmerge_adapter()  # outside the timing: a switch is not a request
            else:
                model.merge_adapter()
            c0 = time.process_time()
            cases[key]()
            cpu[key].append(time.process_time() - c0)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"threads={args.threads} rounds={args.rounds} prompt_len={args.prompt_len}")
    print(f"merge {merge_ms:.1f} ms, unmerge {unmerge_ms:.1f} ms (one adapter, all its layers)")
    print(
        f"{'batch':>5} {'base ms':>8} {'unmerged':>9} {'merged':>8} {'unm/base':>9} {'mrg/base':>9}"
    )
    for b in (1, 16):
        base, unm, mrg = (cpu[f"{m}/b{b}"] for m in ("base", "unmerged", "merged"))
        r_unm = statistics.median(u / x for u, x in zip(unm, base, strict=True))
        r_mrg = statistics.median(m / x for m, x in zip(mrg, base, strict=True))
        print(
            f"{b:>5} {1000 * statistics.median(base):>8.0f} {1000 * statistics.median(unm):>9.0f} "
            f"{1000 * statistics.median(mrg):>8.0f} {r_unm:>9.3f} {r_mrg:>9.3f}"
        )


if __name__ == "__main__":
    main()
