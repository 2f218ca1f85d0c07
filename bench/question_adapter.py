"""Recall@k of the gold passage before and after training a question-encoder adapter.

Questions come from the demo corpus the way scripts/make_demo_tasks.py derives them (definitional
sentences, "X is a Y ..." -> "What is X?", answer the short noun phrase), but chunked at the
index's 100 words, so each question's gold passage is the index passage holding its sentence.
A seeded split trains a bundle (`lorag adapter train --question-encoder`, generator LoRA and
question-encoder LoRA together, the RAG marginal likelihood) on the train questions, with their
candidates retrieved from the demo index by the base encoder and no gold label anywhere in
training; recall@1/5/10 of the gold passage over the *whole* index is measured on the held-out
questions with the base encoder and with the bundle's question adapter (lorag's serving path).

    python -m bench.question_adapter --out /tmp/lorag-qa   # a JSON report on stdout
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from app.cli import training_config
from app.lora.bundle import prepare_task
from app.lora.question_adapters import QuestionAdapters
from app.retrieval.store import PassageIndex
from app.settings import Settings
from app.training.options import TrainOptions
from app.training.train import train_adapter

log = logging.getLogger("bench.question_adapter")
KS = (1, 5, 10)


def _make_demo_tasks() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "make_demo_tasks.py"
    spec = importlib.util.spec_from_file_location("make_demo_tasks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_demo_tasks"] = module
    spec.loader.exec_module(module)
    return module


def derive(source: Path, index: PassageIndex) -> list[dict[str, str]]:
    """Questions with their answer and gold passage id, in the corpus' round-robin order."""
    tasks = _make_demo_tasks()
    facts, _ = tasks.collect(source, 100)  # 100 words: the index's chunking
    ids = {p.id for p in index.passages}
    out, seen = [], set()
    for f in facts:
        q = tasks.question(f)
        if f.passage.id in ids and q not in seen:
            seen.add(q)
            out.append({"question": q, "answer": f.answer, "gold": f.passage.id})
    return out


def recall(ranked: Sequence[Sequence[str]], gold: Sequence[str]) -> dict[str, float]:
    """Fraction of questions whose gold id is in the first k, per k."""
    return {
        f"recall@{k}": round(
            float(np.mean([g in r[:k] for r, g in zip(ranked, gold, strict=True)])), 4
        )
        for k in KS
    }


def flips(
    base: Sequence[Sequence[str]], tuned: Sequence[Sequence[str]], gold: Sequence[str]
) -> dict[str, list[int]]:
    """Per k, [questions the adapter brings into the top k, questions it pushes out]: the paired
    view that a difference of two recalls hides."""
    out = {}
    for k in KS:
        b = [g in r[:k] for r, g in zip(base, gold, strict=True)]
        t = [g in r[:k] for r, g in zip(tuned, gold, strict=True)]
        out[f"@{k}"] = [sum(x and not y for x, y in zip(t, b, strict=True)),
                        sum(y and not x for x, y in zip(t, b, strict=True))]  # fmt: skip
    return out


def ranked_ids(index: PassageIndex, vectors: np.ndarray) -> list[list[str]]:
    return [[h.passage.id for h in hits] for hits in index.search(vectors, max(KS))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/lorag-qa"))
    p.add_argument("--index-dir", type=Path, default=Path("index"))
    p.add_argument("--index-name", default="demo")
    p.add_argument("--source", type=Path, default=Path("index/sources/demo.jsonl"))
    p.add_argument("--generator", default="default")
    p.add_argument("--train", type=int, default=64, help="training questions (rest held out)")
    p.add_argument("--objective", choices=("token", "sequence"), default="token")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--question-lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--last-layers", type=int, default=2, help="generator LoRA in its last N")
    p.add_argument("--question-last-layers", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip-train", action="store_true", help="measure the bundle already under --out"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    settings = Settings(
        index_dir=args.index_dir,
        index_name=args.index_name,
        adapters_dir=args.out / "adapters",
        generator=args.generator,
    )
    encoder = settings.encoder_spec.load()
    index = PassageIndex.load(settings.index_path, expect_fingerprint=encoder.fingerprint)
    rows = derive(args.source, index)
    random.Random(args.seed).shuffle(rows)
    train, held = rows[: args.train], rows[args.train :]
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in train
        )
    )
    log.info("%d questions: %d train, %d held out", len(rows), len(train), len(held))

    opts = TrainOptions(
        data=data,
        name="qa-bench",
        base=args.generator,
        rank=args.rank,
        alpha=2.0 * args.rank,
        dropout=0.0,
        target_modules="attention",
        last_layers=args.last_layers,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        top_k=args.top_k,
        objective=args.objective,
        seed=args.seed,
        heldout=0.0,
        eval_max_new_tokens=0,
        force=True,
        question_encoder=True,
        question_lr=args.question_lr,
        question_last_layers=args.question_last_layers,
        candidates=args.candidates,
        max_steps=args.max_steps,
    )
    t = time.perf_counter()
    if args.skip_train:
        summary_file = settings.adapters_dir / opts.name / "training_summary.json"
        training = json.loads(summary_file.read_text())["train"]
    else:
        training = train_adapter(opts, training_config(settings)).summary["train"]
    train_s = time.perf_counter() - t

    adapters = QuestionAdapters(encoder)
    task = prepare_task(
        settings.adapters_dir,
        opts.name,
        encoder_fingerprint=encoder.fingerprint,
        question_layout=adapters.layout,
    )
    assert task.question is not None
    adapters.install(opts.name, task.question)
    report: dict[str, Any] = {
        "questions": {"train": len(train), "heldout": len(held)},
        "options": opts.to_json(),
        "train_seconds": round(train_s, 1),
        "training": training,
    }
    for split, part in (("heldout", held), ("train", train)):
        qs, gold = [r["question"] for r in part], [r["gold"] for r in part]
        base = ranked_ids(index, encoder.encode_questions(qs))
        tuned = ranked_ids(index, adapters.encode(qs, opts.name))
        report[split] = {
            "base": recall(base, gold),
            "adapter": recall(tuned, gold),
            "gained_lost": flips(base, tuned, gold),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
