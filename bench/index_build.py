"""Index build throughput: lorag's embedding path against a plain SentenceTransformer.encode.

Both embed the same demo-corpus passages (index/sources/demo.jsonl through collect_passages) with
the packaged all-MiniLM-L6-v2:

    lorag               builder.embed_passages: blocks of 512 -> encode_passages (batch 64)
    plain loop          SentenceTransformer.encode over the passages 32 at a time, in corpus order
                        (a script's loop: each call sorts only its own 32)
    plain encode(all)   one SentenceTransformer.encode call over all (it sorts all by length)

Runs are interleaved (lorag, plain loop, plain encode(all), lorag, ...) so load from other
processes falls on all; passages/s are medians over --repeats. The vectors of lorag and the plain
loop are compared too (same model, same text: they must agree). --batch-sizes sweeps
encode_passages' batch size.

    .venv/bin/python -m bench.index_build --n 1000 --repeats 3 [--bf16] [--batch-sizes 16,32,128]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from app.contracts import Passage
from app.retrieval.builder import collect_passages, embed_passages
from app.retrieval.encoders import SentenceTransformerEncoder, default_encoder_path

logger = logging.getLogger("bench.index_build")
LOOP_BATCH = 32  # SentenceTransformer.encode's default batch size
DEMO = Path(__file__).resolve().parents[1] / "index" / "sources" / "demo.jsonl"


def _plain(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    vectors = model.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors)  # [n, dim]


def _bf16(run: Callable[[], np.ndarray]) -> np.ndarray:
    """bfloat16 matmuls (AMX/AVX-512 where the CPU has them); vectors differ in the 5th digit."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return run()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="passages embedded per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="", help="also time encode_passages at these")
    ap.add_argument("--bf16", action="store_true", help="also time lorag under bf16 autocast")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    passages: list[Passage] = collect_passages([DEMO])[: args.n]
    texts = [SentenceTransformerEncoder.passage_text(p) for p in passages]
    encoder = SentenceTransformerEncoder.load("default")
    plain_model = SentenceTransformer(str(default_encoder_path()), device="cpu")
    logger.info("%d passages, torch threads %d", len(passages), torch.get_num_threads())

    runs: dict[str, Callable[[], np.ndarray]] = {
        "lorag": lambda: embed_passages(passages, encoder, show_progress=False),
        "plain loop": lambda: np.concatenate(
            [
                _plain(plain_model, texts[i : i + LOOP_BATCH])
                for i in range(0, len(texts), LOOP_BATCH)
            ]
        ),
        "plain encode(all)": lambda: _plain(plain_model, texts),
    }
    if args.bf16:
        runs["lorag bf16"] = lambda: _bf16(
            lambda: embed_passages(passages, encoder, show_progress=False)
        )
    for b in filter(None, args.batch_sizes.split(",")):
        runs[f"lorag batch={b}"] = partial(encoder.encode_passages, passages, batch_size=int(b))

    seconds: dict[str, list[float]] = {name: [] for name in runs}
    vectors: dict[str, np.ndarray] = {}
    runs["plain loop"]()  # warm up both (first-call allocations)
    runs["lorag"]()
    for rep in range(args.repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            vectors[name] = run()
            seconds[name].append(time.perf_counter() - t)
            logger.info(
                "repeat %d %s: %.0f passages/s", rep, name, len(passages) / seconds[name][-1]
            )

    diff = float(np.abs(vectors["lorag"] - vectors["plain loop"]).max())
    print(f"\n{len(passages)} demo passages, {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats}; max |lorag - plain| = {diff:.2e}")  # fmt: skip
    print("| path | passages/s | ratio to plain loop |")
    print("| --- | --- | --- |")
    rate = {name: len(passages) / statistics.median(s) for name, s in seconds.items()}
    for name, r in rate.items():
        print(f"| {name} | {r:.0f} | {r / rate['plain loop']:.2f} |")
    if "lorag bf16" in vectors:
        cos = (vectors["lorag bf16"] * vectors["lorag"]).sum(axis=1)  # both unit vectors
        print(f"bf16 vs float32 vectors: min cosine {cos.min():.6f}")
    print(
        f"\nlorag / plain SentenceTransformer.encode loop: "
        f"{rate['lorag'] / rate['plain loop']:.2f}x "
        f"(/ one encode call over all: {rate['lorag'] / rate['plain encode(all)']:.2f}x)"
    )


if __name__ == "__main__":
    main()
