"""What an encoder-decoder could reuse across requests, and what reusing it gives.

A seq2seq row's encoder input is its whole prompt (concat: question + every passage; RAG-Token
and RAG-Sequence: question + one passage), read bidirectionally, so no prefix of it has keys and
values of its own: only an identical input's encoder output repeats (and the cross-attention
keys and values the decoder's first step projects from it). This measures, on randomly
initialized models of the real shapes (shape, not weights, sets the cost; none ships offline):
T5-base (12+12 layers, d 768) and BART-base (6+6, d 768), with the default generator's BPE
tokenizer (SmolLM2's, ~GPT-2's token counts: BART's own is GPT-2's) and its vocabulary, prompts
of the demo index's top_k passages for bench/data's held-out questions:

- shares: one request at a time and 16 at once, through the step batch: the whole request
  (prefill + max_new_tokens steps), the encoder alone, and the cross-attention key/value
  projections alone (every decoder layer's k and v of the encoder output);
- repeats: on bench/prefix_reuse.py's Zipf workload (its generator, 300 questions), the share
  of requests (and of encoder input tokens) whose (adapter, input) an earlier request had;
- onoff: through the engine (bench/prefix_reuse.serve), 16 clients, the Zipf requests, cache
  on and off interleaved per round.

    .venv/bin/python -m bench.seq2seq_reuse --part shares [--kinds t5 bart]
    .venv/bin/python -m bench.seq2seq_reuse --part repeats
    .venv/bin/python -m bench.seq2seq_reuse --part onoff --kinds t5 --requests 32 --rounds 2 \
        [--warm 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from app.contracts import GenRow, Hit
from app.engine.requests import EngineRequest
from app.generation.family import core
from app.generation.generator import Generator
from app.generation.loading import prepare_default_generator
from app.generation.step_batch import decode, pad
from app.settings import Settings
from app.wiring import Components, load_components
from bench.prefix_reuse import draws, question_set, serve
from bench.serve_throughput import pct

log = logging.getLogger(__name__)
ADAPTERS = ("", "a1", "a2")  # base and two random LoRA adapters, taking turns (prefix_reuse's)


def unchecked(**kwargs: Any) -> dict[str, Any]:
    """Config keywords that transformers' stubs do not declare."""
    return kwargs


def shaped(kind: str, out: Path) -> Path:
    """A randomly initialized T5-base- or BART-base-shaped model with the default generator's
    tokenizer, and two random LoRA adapters (q and v) under out/adapters."""
    settings = Settings()
    tok = AutoTokenizer.from_pretrained(prepare_default_generator(settings.cache_dir))
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    eos = int(tok.eos_token_id)
    torch.manual_seed(0)
    model: Any
    if kind == "t5":
        cfg = T5Config(
            vocab_size=len(tok), d_model=768, d_kv=64, d_ff=3072, num_layers=12,
            num_decoder_layers=12, num_heads=12, pad_token_id=pad_id, eos_token_id=eos,
            **unchecked(decoder_start_token_id=pad_id),
        )  # fmt: skip
        model, targets = T5ForConditionalGeneration(cfg), ["q", "v"]
    else:
        bcfg = BartConfig(
            vocab_size=len(tok), d_model=768, encoder_layers=6, decoder_layers=6,
            encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
            decoder_ffn_dim=3072, max_position_embeddings=1024, pad_token_id=pad_id,
            eos_token_id=eos, bos_token_id=pad_id, decoder_start_token_id=eos,
            forced_eos_token_id=None, **unchecked(forced_bos_token_id=None),
        )  # fmt: skip
        model, targets = BartForConditionalGeneration(bcfg), ["q_proj", "v_proj"]
    model_dir = out / kind
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for i, name in enumerate(a for a in ADAPTERS if a):
        torch.manual_seed(i + 1)
        lora = LoraConfig(
            r=8, lora_alpha=8, target_modules=targets, init_lora_weights=False,
            task_type="SEQ_2_SEQ_LM",
        )  # fmt: skip
        get_peft_model(type(model)(model.config), lora).save_pretrained(
            str(out / "adapters" / name)
        )
    return model_dir


def components(kind: str, root: Path) -> Components:
    model_dir = shaped(kind, root)
    return load_components(
        Settings(generator=str(model_dir), adapters_dir=root / "adapters", abstain=False)
    )


def heldout(n: int) -> list[str]:
    with Path("bench/data/answerable_heldout.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["question"] for line in f][:n]


def cross_kv(model: Any, hidden: torch.Tensor) -> None:
    """Every decoder layer's cross-attention key and value projections of hidden."""
    m = core(model)
    for layer in m.get_decoder().layers if hasattr(m.get_decoder(), "layers") else []:
        layer.encoder_attn.k_proj(hidden), layer.encoder_attn.v_proj(hidden)
    for block in getattr(m.get_decoder(), "block", []):
        att = block.layer[1].EncDecAttention
        att.k(hidden), att.v(hidden)


def timed(reps: int, fn: Any, *args: Any, **kwargs: Any) -> float:
    """The median seconds of reps calls of fn(*args, **kwargs)."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        with torch.inference_mode():
            fn(*args, **kwargs)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def shares(parts: Components, args: argparse.Namespace) -> None:
    gen: Generator = parts.generator
    qs = heldout(args.batch)
    hits: list[list[Hit]] = parts.retriever.retrieve(qs, args.top_k)
    for mode in ("concat", "token"):
        rows = [
            GenRow(q, [h.passage for h in hs], None, args.max_new_tokens, mode,
                   scores=[h.score for h in hs])
            for q, hs in zip(qs, hits, strict=True)
        ]  # fmt: skip
        for size in (1, args.batch):
            batch_rows = rows[:size]
            prompts = [
                p
                for r in batch_rows
                for p in (
                    [gen.concat_prompt(r)]
                    if mode == "concat"
                    else gen.passage_prompts(r.question, r.passages, r.max_new_tokens)
                )
            ]
            ids, mask = pad(prompts, gen.pad_id, left=False, device=gen.device)
            encoder = core(gen.model).get_encoder()
            reps = args.reps if size == 1 else 1
            enc_s = timed(reps, encoder, input_ids=ids, attention_mask=mask)
            with torch.inference_mode():
                hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            kv_s = timed(reps, cross_kv, gen.model, hidden)
            whole = timed(reps, decode, gen, batch_rows)
            real = sum(len(p) for p in prompts)
            print(
                f"{args.kind} {mode:6s} batch {size:2d}: {len(prompts)} encoder rows, "
                f"{real / len(prompts):.0f} tokens each (padded {ids.shape[1]}); request(s) "
                f"{whole:.3f} s, encoder {enc_s:.3f} s ({enc_s / whole:.0%}), cross k/v "
                f"{kv_s:.3f} s ({kv_s / whole:.0%}); {args.max_new_tokens} new tokens",
                flush=True,
            )


def zipf_requests(n: int, zipf: float, seed: int) -> list[tuple[str, str | None]]:
    """bench/prefix_reuse's Zipf draws, adapters taking turns as there."""
    names = [a or None for a in ADAPTERS]
    qs = draws(question_set(300), n, zipf, seed)
    return [(q, names[i % len(names)]) for i, q in enumerate(qs)]


def repeats(args: argparse.Namespace) -> None:
    """Exact repeats of (adapter, encoder input). The retriever is deterministic and the
    question is in every input, so an input repeats exactly when (question, adapter) does."""
    for n in (32, 300):
        for label, turns in (("3 adapters", True), ("base only", False)):
            reqs = zipf_requests(n, args.zipf, 0)
            if not turns:
                reqs = [(q, None) for q, _ in reqs]
            seen: set[tuple[str, str | None]] = set()
            hit = 0
            for r in reqs:
                hit += r in seen
                seen.add(r)
            print(f"zipf {n:3d} requests, {label}: {hit / n:.1%} repeat an earlier input")


def onoff(parts: Components, args: argparse.Namespace) -> None:
    reqs_q = zipf_requests(args.requests, args.zipf, 0)
    hits = parts.retriever.retrieve([q for q, _ in reqs_q], args.top_k)
    reqs = [
        (EngineRequest(q, [h.passage for h in hs], None, args.max_new_tokens), name)
        for (q, name), hs in zip(reqs_q, hits, strict=True)
    ]
    for name in {n for _, n in reqs if n}:
        parts.registry.install(name, parts.registry.prepare(name))
    # a server in steady state (prefix_reuse's --warm): --warm earlier requests of the same
    # traffic answered first, untimed, on the cache-on arm's engine and cache
    warm_q = zipf_requests(args.warm, args.zipf, 2)
    warm_hits = parts.retriever.retrieve([q for q, _ in warm_q], args.top_k) if warm_q else []
    warm = [
        (EngineRequest(q, [h.passage for h in hs], None, args.max_new_tokens), name)
        for (q, name), hs in zip(warm_q, warm_hits, strict=True)
    ]
    asyncio.run(serve(parts, reqs[:2], 2, 0))  # warm-up
    out: dict[bool, list[tuple[float, list[float], int, int]]] = {True: [], False: []}
    for r in range(args.rounds):
        for on in (True, False) if r % 2 == 0 else (False, True):
            cache = args.cache_mib << 20 if on else 0
            res = asyncio.run(serve(parts, reqs, args.clients, cache, warm if on else None))
            out[on].append(res)
            wall, firsts, prompt, reused = res
            print(
                f"round {r + 1} {args.kind} cache {'on ' if on else 'off'}: "
                f"{args.requests / wall:.3f} req/s, ttft p50 {pct(firsts, 50):.2f} s "
                f"p99 {pct(firsts, 99):.2f} s, reused {reused / max(prompt, 1):.0%}",
                flush=True,
            )

    def med(on: bool, f: Any) -> float:
        return statistics.median(f(x) for x in out[on])

    def rps(x: Sequence[Any]) -> float:
        return float(args.requests / x[0])

    print(
        f"{args.kind} on/off: throughput {med(True, rps) / med(False, rps):.2f}x, ttft p50 "
        f"{med(True, lambda x: pct(x[1], 50)) / med(False, lambda x: pct(x[1], 50)):.2f}x, "
        f"p99 {med(True, lambda x: pct(x[1], 99)) / med(False, lambda x: pct(x[1], 99)):.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("shares", "repeats", "onoff"), required=True)
    ap.add_argument("--kinds", nargs="+", default=["t5", "bart"], choices=("t5", "bart"))
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--cache-mib", type=int, default=256)
    ap.add_argument("--warm", type=int, default=0, help="onoff: requests answered first")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.part == "repeats":
        repeats(args)
        return
    for kind in args.kinds:
        args.kind = kind
        with tempfile.TemporaryDirectory() as tmp:
            parts = components(kind, Path(tmp))
            (shares if args.part == "shares" else onoff)(parts, args)


if __name__ == "__main__":
    main()
