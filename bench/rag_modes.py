"""Cost and answer quality of the decoding modes: concat, RAG-Token, RAG-Sequence (fast, thorough).

For each k, every mode answers the same demo questions with the same retrieved passages,
interleaved question by question (concat, token, seq-fast, seq-thorough, concat, ...), so
machine noise falls on all modes alike. Quality: the gold answer appears in the generated
answer (case-insensitive), over index/sources/demo_questions.json. Cost: median seconds per
question. Ratios to concat are printed last.

    .venv/bin/python -m bench.rag_modes                      # the default generator
    .venv/bin/python -m bench.rag_modes --t5-small   # T5-small-shaped random weights: cost only
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.contracts import GenRow
from app.generation.step_batch import decode
from app.settings import Settings
from app.wiring import load_components

MODES: list[tuple[str, str]] = [
    ("concat", "thorough"),
    ("token", "thorough"),
    ("sequence", "fast"),
    ("sequence", "thorough"),
]


def label(mode: str, decoding: str) -> str:
    return mode if mode != "sequence" else f"seq-{decoding}"


def t5_small(folder: Path) -> Path:
    """A T5-small-shaped model with random weights (no hub here), with a byte tokenizer."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=384, d_model=512, d_ff=2048, num_layers=6, num_heads=8,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    cfg.decoder_start_token_id = 0  # an extra attribute: not a declared T5Config field
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="1,5,10")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--t5-small", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = Settings()
    if args.t5_small:
        settings = Settings(generator=str(t5_small(Path(tempfile.mkdtemp()) / "t5-small")))
    comps = load_components(settings)
    demo = json.loads(Path("index/sources/demo_questions.json").read_text())["questions"]
    ks = [int(k) for k in args.ks.split(",")]
    print(
        f"generator {comps.generator.model_id}, {len(demo)} questions, "
        f"max_new_tokens {args.max_new_tokens}, torch threads {torch.get_num_threads()}"
    )

    summary: dict[tuple[int, str], tuple[float, float]] = {}
    for k in ks:
        hits = comps.retriever.retrieve([q["question"] for q in demo], k)
        seconds: dict[str, list[float]] = {label(*m): [] for m in MODES}
        correct: dict[str, int] = {label(*m): 0 for m in MODES}
        for _ in range(args.repeats):
            for q, h in zip(demo, hits, strict=True):
                for mode, decoding in MODES:
                    row = GenRow(q["question"], [x.passage for x in h], None,
                                 args.max_new_tokens, mode, decoding,  # type: ignore[arg-type]
                                 [x.score for x in h])  # fmt: skip
                    t = time.perf_counter()
                    answer = decode(comps.generator, [row])[0]
                    seconds[label(mode, decoding)].append(time.perf_counter() - t)
                    correct[label(mode, decoding)] += q["answer"].lower() in answer.text.lower()
        print(
            f"k={k}: " + ", ".join(f"{n} {statistics.median(v):.2f}s" for n, v in seconds.items()),
            flush=True,
        )
        for name in seconds:
            summary[(k, name)] = (
                statistics.median(seconds[name]),
                correct[name] / (len(demo) * args.repeats),
            )

    print(f"{'k':>3} {'mode':14} {'s/question':>11} {'answer found':>13} {'cost vs concat':>15}")
    for k in ks:
        base = summary[(k, "concat")][0]
        for mode, decoding in MODES:
            name = label(mode, decoding)
            sec, acc = summary[(k, name)]
            print(f"{k:>3} {name:14} {sec:11.2f} {acc:13.2f} {sec / base:14.2f}x")


if __name__ == "__main__":
    main()
