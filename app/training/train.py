"""Train one LoRA adapter on a JSONL file and save it under adapters/NAME, atomically.

Order of work: validate options and data (no model yet), retrieve passages for examples that have
none, load the base, evaluate the held-out split, train, evaluate again, then write the adapter
and training_summary.json into a hidden temporary folder beside the target and rename it into
place. A crash or Ctrl-C at any point removes the temporary folder: adapters/NAME is either the
old adapter or the complete new one, never half of either.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.errors import InvalidInputError
from app.generation.generator import Generator
from app.lora.bundle import QUESTION_DIR, TaskManifest, write_manifest
from app.retrieval.encoders import TextEncoder
from app.retrieval.question_tower import tower_of
from app.training.config import TrainingConfig
from app.training.data import Example, file_sha256, load_examples, split_heldout
from app.training.eval import Metrics, answer_budget, evaluate, heldout_loss
from app.training.losses import Sample, batch_nll
from app.training.model import ADAPTER, add_lora, base_fingerprint, load_base, resolve_base
from app.training.options import TrainOptions
from app.training.question import (
    QuestionTraining,
    add_question_lora,
    candidate_vectors,
    pick_top_k,
    retrieve_with,
    trainable_parameters,
)

log = logging.getLogger(__name__)

SUMMARY_NAME = "training_summary.json"


@dataclass(frozen=True)
class TrainResult:
    path: Path
    summary: dict[str, Any]


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def resolve_samples(
    examples: Sequence[Example],
    config: TrainingConfig,
    top_k: int,
    encoder: TextEncoder | None = None,
) -> list[Sample]:
    """Samples with passages: as given, or the top_k of the configured index."""
    missing = [e for e in examples if e.passages is None]
    hits: dict[int, tuple[Any, ...]] = {}
    if missing:
        from app.retrieval.retriever import Retriever

        encoder = encoder or config.encoder.load()
        with config.store(encoder.fingerprint) as store:
            found = Retriever(encoder, store).retrieve([e.question for e in missing], top_k)
        hits = {id(e): tuple(h) for e, h in zip(missing, found, strict=True)}
        log.info("retrieved %d passages each for %d examples", top_k, len(missing))
    samples = []
    for e in examples:
        if e.passages is not None:
            samples.append(Sample(e.question, e.answer, e.passages, e.scores))
        else:
            got = hits[id(e)]
            passages = tuple(h.passage for h in got)
            samples.append(Sample(e.question, e.answer, passages, tuple(h.score for h in got)))
    return samples


def train_adapter(
    opts: TrainOptions,
    config: TrainingConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train and save adapters_dir/opts.name; returns its path and the summary written there."""
    started = time.perf_counter()
    target = config.adapters_dir / opts.name
    if target.exists() and not opts.force:
        raise InvalidInputError(f"adapter folder {str(target)!r} exists; pass --force to replace")
    examples = load_examples(opts.data, max_answer_chars=opts.max_answer_chars)
    data_sha = file_sha256(opts.data)
    train_ex, held_ex = split_heldout(examples, opts.heldout, opts.seed)
    question: QuestionTraining | None = None
    if opts.question_encoder:
        # each question keeps `candidates` passages; the top_k are re-picked from them
        encoder = config.encoder.load()
        train_set = resolve_samples(train_ex, config, opts.candidates, encoder)
        held_cands = resolve_samples(held_ex, config, opts.candidates, encoder)
        tower = tower_of(encoder)
        held_vectors = candidate_vectors(encoder, held_cands)
        question = QuestionTraining(
            tower, add_question_lora(tower, opts), candidate_vectors(encoder, train_set), opts.top_k
        )
        held_set = retrieve_with(tower, None, held_cands, held_vectors, opts.top_k)
    else:
        train_set = resolve_samples(train_ex, config, opts.top_k)
        held_set = resolve_samples(held_ex, config, opts.top_k)
    log.info(
        "%d training and %d held-out examples from %s", len(train_set), len(held_set), opts.data
    )

    random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    source, model_id = resolve_base(opts.base, config.cache_dir)
    g = load_base(opts, config.cache_dir)
    add_lora(g, opts, kind=g.kind)
    reserve = config.answer_reserve  # /ask's default answer budget: prompts fit it the same way
    budget = opts.eval_max_new_tokens
    if budget is None:
        budget = answer_budget(g, held_set) if held_set else 0

    before = _evaluate(g, held_set, opts, None, reserve, budget)
    losses, step_times = _train_loop(g, train_set, opts, reserve, on_step, question)
    question_summary: dict[str, Any] | None = None
    if question is not None:  # held-out passages as the trained question encoder picks them
        question.model.eval()
        base_held = held_set
        held_set = retrieve_with(
            question.tower, question.model, held_cands, held_vectors, opts.top_k
        )
        question_summary = _question_summary(question, base_held, held_set, opts)
    after = _evaluate(g, held_set, opts, ADAPTER, reserve, budget)

    summary: dict[str, Any] = {
        "name": opts.name,
        "data": {
            "file": str(opts.data),
            "sha256": data_sha,
            "examples": len(examples),
            "train": len(train_set),
            "heldout": len(held_set),
        },
        "options": opts.to_json(),
        "base": {
            "spec": opts.base,
            "model_id": model_id,
            "kind": g.kind,
            "fingerprint": base_fingerprint(source),
            "quantization": "nf4+double-quant" if opts.qlora else None,
        },
        "metrics": {
            "before": before[0].to_json() if before else None,
            "after": after[0].to_json() if after else None,
            "eval_max_new_tokens": budget,
        },
        "samples": _samples(held_set, before, after),
        "train": {
            "steps": len(step_times),
            "first_loss": round(losses[0], 4) if losses else None,
            "last_loss": round(losses[-1], 4) if losses else None,
            "mean_step_s": round(sum(step_times) / max(len(step_times), 1), 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),  # load + train + eval, before saving
            "torch_threads": torch.get_num_threads(),
        },
        "question_encoder": question_summary,
    }
    manifest = TaskManifest(
        question_encoder=QUESTION_DIR if question is not None else None,
        mode=opts.objective,
        top_k=opts.top_k,
        generator={"model_id": model_id, "fingerprint": summary["base"]["fingerprint"]},
        encoder=question.tower.fingerprint if question is not None else None,
    )
    path = _save_atomically(
        g, target, summary, started, opts, config, held_set, reserve, question, manifest
    )
    return TrainResult(path, json.loads((path / SUMMARY_NAME).read_text()))


def _evaluate(
    g: Generator,
    held: Sequence[Sample],
    opts: TrainOptions,
    adapter: str | None,
    reserve: int,
    budget: int,
) -> tuple[Metrics, list[str]] | None:
    if not held:
        return None
    t = time.perf_counter()
    if budget == 0:  # loss only, no greedy answers
        loss = heldout_loss(g, held, opts.objective, batch_size=opts.batch_size, reserve=reserve)
        return Metrics(loss=loss, examples=len(held)), [""] * len(held)
    result = evaluate(
        g,
        held,
        opts.objective,
        adapter,
        batch_size=opts.batch_size,
        reserve=reserve,
        max_new_tokens=budget,
    )
    log.info(
        "held-out (%s) %s in %.1f s",
        adapter or "base",
        result[0].to_json(),
        time.perf_counter() - t,
    )
    return result


def _samples(
    held: Sequence[Sample],
    before: tuple[Metrics, list[str]] | None,
    after: tuple[Metrics, list[str]] | None,
    n: int = 5,
) -> list[dict[str, str]]:
    if before is None or after is None:
        return []
    return [
        {"question": s.question, "reference": s.answer, "base": b, "adapter": a}
        for s, b, a in list(zip(held, before[1], after[1], strict=True))[:n]
    ]


def _question_summary(
    q: QuestionTraining, base: Sequence[Sample], trained: Sequence[Sample], opts: TrainOptions
) -> dict[str, Any]:
    trainable, _total = q.model.get_nb_trainable_parameters()
    changed = sum(a.passages[0].id != b.passages[0].id for a, b in zip(base, trained, strict=True))
    return {
        "encoder": q.tower.fingerprint,
        "candidates": opts.candidates,
        "trainable_parameters": trainable,
        "heldout_top1_changed": round(changed / len(base), 4) if base else None,
    }


def _train_loop(
    g: Generator,
    train_set: Sequence[Sample],
    opts: TrainOptions,
    reserve: int,
    on_step: Callable[[int, float], None] | None,
    question: QuestionTraining | None = None,
) -> tuple[list[float], list[float]]:
    """AdamW over the LoRA weights (and the question encoder's, with their own learning rate);
    returns per-step losses and seconds."""
    model = g.model
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params, "lr": opts.lr}]
    if question is not None:
        groups.append({"params": trainable_parameters(question), "lr": opts.question_lr or opts.lr})
        question.model.train()
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=0.0)
    per_epoch = -(-len(train_set) // opts.batch_size)
    total = per_epoch * opts.epochs
    if opts.max_steps is not None:
        total = min(total, opts.max_steps)
    rng = random.Random(opts.seed)
    losses: list[float] = []
    times: list[float] = []
    model.train()
    bar = tqdm(total=total, desc=f"train {opts.name}", unit="step", dynamic_ncols=True)
    try:
        for _epoch in range(opts.epochs):
            order = list(range(len(train_set)))
            rng.shuffle(order)
            for i in range(0, len(order), opts.batch_size):
                if len(losses) >= total:
                    break
                t = time.perf_counter()
                rows = order[i : i + opts.batch_size]
                batch = [train_set[j] for j in rows]
                scores = None
                if question is not None:  # re-pick the top k by the current q(x), with grad
                    q = question.tower.encode([s.question for s in batch], question.model)
                    vectors = [question.vectors[j] for j in rows]
                    batch, scores = pick_top_k(q, batch, vectors, question.top_k)
                nll, n_tokens = batch_nll(
                    g, batch, opts.objective, reserve=reserve, doc_scores=scores
                )
                loss = nll / max(n_tokens, 1)  # mean NLL per answer token
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                times.append(time.perf_counter() - t)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if on_step is not None:
                    on_step(len(losses), losses[-1])
    finally:
        bar.close()
        model.eval()
        if question is not None:
            question.model.eval()
    return losses, times


def _save_atomically(
    g: Generator,
    target: Path,
    summary: dict[str, Any],
    started: float,
    opts: TrainOptions,
    config: TrainingConfig,
    held: Sequence[Sample],
    reserve: int,
    question: QuestionTraining | None = None,
    manifest: TaskManifest | None = None,
) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        peft_model: Any = g.model  # a PeftModel (typed as a Module by the backend)
        peft_model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's blank model card template
        if question is not None:  # a plain PEFT folder for the encoder's transformer
            question.model.save_pretrained(str(tmp / QUESTION_DIR))
            (tmp / QUESTION_DIR / "README.md").unlink(missing_ok=True)
        if manifest is not None:
            write_manifest(tmp, manifest)
        if opts.qlora and held:
            summary["metrics"]["after_on_full_precision_base"] = _served_loss(
                tmp, opts, config, held, reserve
            )
        summary["duration_s"] = round(time.perf_counter() - started, 1)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a server may run as another user
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if target.exists():  # --force: move the old one aside, then swap
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved adapter %s in %.1f s", target, time.perf_counter() - started)
    return target


def _served_loss(
    folder: Path, opts: TrainOptions, config: TrainingConfig, held: Sequence[Sample], reserve: int
) -> dict[str, float]:
    """Held-out loss of a QLoRA adapter served the usual way: full-precision base, registry."""
    from app.generation.loading import load_generator
    from app.lora.registry import AdapterRegistry

    g = load_generator(opts.base, cache_dir=config.cache_dir)
    registry = AdapterRegistry(g, folder.parent)
    registry.install(opts.name, registry.prepare(folder.name))
    loss = heldout_loss(g, held, opts.objective, batch_size=opts.batch_size, reserve=reserve)
    return {"loss": round(loss, 4)}
