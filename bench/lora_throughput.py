"""Greedy-generate throughput with per-row LoRA adapters: base vs PEFT adapter_names vs BatchedLora.

A T5-small-shaped model with random weights (built from a config, no download), rank-8 LoRA
adapters (random A and B) on every linear layer (q, k, v, o, wi, wo), batch 16, a fixed-length
prompt, exactly 32 new tokens greedy. Each round runs every variant once, in a rotating order
(A B A B ...), so that load from other processes on a shared machine hits all variants alike;
the figures are medians over rounds, tokens/s = rows * new tokens / wall time of generate().

--planned adds ours with each configuration's plan (BatchedLora.plan: the rows' gathered A and B)
made once before the rounds and reused by every call, as the step engine reuses a plan across
the decoding steps of unchanged rows; printed as a ratio to the base.
--bf16-stacks adds ours with the stacks cast to bfloat16 for the call (half the bytes a step
reads; outputs no longer PEFT's), printed as a ratio to the base.
--gathered adds ours with the dense decoding steps off (every mixed batch through gathered
rows), and prints ours / that per configuration: the A/B of the dense products.

Distinct adapters per batch: 1, 4, 16 at batch 16 (rows take adapters round-robin), and 64 at
batch 64 (every row its own adapter; a 16-row batch cannot hold 64), with its own base run.
Printed per configuration: tokens/s by wall time and by CPU time (medians), the ratios to the
base (median of per-round ratios: the runs of one round share the machine's load), and the
fraction of generated tokens equal to PEFT's.

    .venv/bin/python -m bench.lora_throughput [--rounds 5] [--threads 1] [--prompt-len 64]
        [--distinct 1 4 16 64] [--rank 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypedDict, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import T5Config, T5ForConditionalGeneration

from app.lora import batched
from app.lora.batched import BatchedLora, RowPlan

NEW_TOKENS = 32
TARGETS = ["q", "k", "v", "o", "wi", "wo"]


def build(
    n_adapters: int, seed: int = 0, rank: int = 8
) -> tuple[T5ForConditionalGeneration, PeftModel]:
    """The plain model (the base figures) and a PeftModel of a copy of it with the adapters."""
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    # not a declared T5Config field (its typed __init__ refuses it); the config keeps it as an
    # extra attribute, which is what passing it to T5Config(...) did
    cfg.decoder_start_token_id = 0
    model = T5ForConditionalGeneration(cfg).eval()
    plain = copy.deepcopy(model)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, lora, adapter_name="a0")
    for i in range(1, n_adapters):
        peft_model.add_adapter(f"a{i}", lora)
    return plain, peft_model.eval()


class GreedyKwargs(TypedDict):
    """The generate() keyword arguments the benches pass."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool


def fixed_length(ids: torch.Tensor) -> GreedyKwargs:
    """generate() kwargs for greedy decoding of exactly NEW_TOKENS tokens after `ids` [B, L]."""
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
    }


def plain_generate(model: T5ForConditionalGeneration, kw: GreedyKwargs) -> torch.Tensor:
    """model.generate(**kw): the token ids [B, T] (no return_dict_in_generate: a tensor)."""
    # transformers 5.23 types GenerationMixin's self as a protocol that mypy finds no
    # PreTrainedModel matches (5.24 does not): called untyped, so both check
    out = cast(Any, model).generate(**kw)
    return cast(torch.Tensor, out)


def _cast_stacks(lora: BatchedLora, dtype: torch.dtype) -> None:
    """Every stack of lora in dtype (refresh() rebuilds them from the adapters)."""
    for layer in lora._layers.values():
        st = layer.stack
        if st is None:
            continue
        pairs = tuple(
            None if p is None else (p[0].to(dtype), p[1].to(dtype), p[2]) for p in st.pairs
        )
        layer.stack = replace(
            st, a=st.a.to(dtype), b=st.b.to(dtype), scale=st.scale.to(dtype), pairs=pairs
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    # one thread by default: on a 2-core machine shared with other work, two OpenMP threads
    # wait on each other at every op (a 16x512x512 matmul measured 7 ms instead of 0.2 ms)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--distinct", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter")
    ap.add_argument(
        "--gathered",
        action="store_true",
        help="also run ours with the dense decoding steps off (gathered rows only), A/B",
    )
    ap.add_argument(
        "--planned",
        action="store_true",
        help="also run ours with one plan made before the rounds and reused by every call",
    )
    ap.add_argument(
        "--bf16-stacks",
        action="store_true",
        help="also run ours with the stacked adapters cast to bfloat16 (half the bytes; not "
        "PEFT's numbers): whether lower precision pays through torch's CPU ops",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    plain, model = build(max(args.distinct), rank=args.rank)
    fast = BatchedLora(model)
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(2, 32000, (b, args.prompt_len), generator=gen) for b in (16, 64)}

    plans: dict[tuple[str, ...], RowPlan] = {}

    def run(batch: int, names: list[str] | None, mode: str) -> Callable[[], torch.Tensor]:
        if mode == "planned" and names is not None:
            plans[tuple(names)] = fast.plan(names)
        ids = prompts[batch]  # the same prompts for every variant of a batch size
        kw = fixed_length(ids)

        def call() -> torch.Tensor:
            with torch.inference_mode():
                if mode == "base":  # the plain transformers model: no LoRA layers at all
                    return plain_generate(plain, kw)
                if mode == "peft":
                    return model.generate(**kw, adapter_names=names)
                assert names is not None
                if mode == "bf16":  # stacks cast for this call, rebuilt in fp32 after it
                    _cast_stacks(fast, torch.bfloat16)
                    try:
                        with fast.rows(names):
                            return model.generate(**kw)
                    finally:
                        fast.refresh()
                if mode == "planned":  # the rows' plan (and its gathers) made once, reused
                    with fast.rows(plans[tuple(names)]):
                        return model.generate(**kw)
                if mode == "gathered":  # plan without the dense products
                    dense, batched.DENSE_ROWS_PER_ADAPTER = batched.DENSE_ROWS_PER_ADAPTER, 10**9
                    try:
                        plan = fast.plan(names)
                    finally:
                        batched.DENSE_ROWS_PER_ADAPTER = dense
                    with fast.rows(plan):
                        return model.generate(**kw)
                with fast.rows(names):
                    return model.generate(**kw)

        return call

    cases: dict[str, Callable[[], torch.Tensor]] = {}
    rows: dict[str, int] = {}
    agree: dict[int, float] = {}
    for n in args.distinct:
        batch = 64 if n > 16 else 16
        names = [f"a{i % n}" for i in range(batch)]
        if f"base/b{batch}" not in cases:
            cases[f"base/b{batch}"] = run(batch, None, "base")
        cases[f"peft/{n}"] = run(batch, names, "peft")
        cases[f"ours/{n}"] = run(batch, names, "ours")
        if args.gathered:
            cases[f"gathered/{n}"] = run(batch, names, "gathered")
        if args.planned:
            cases[f"planned/{n}"] = run(batch, names, "planned")
        if args.bf16_stacks:
            cases[f"bf16/{n}"] = run(batch, names, "bf16")
        rows.update({f"base/b{batch}": batch, f"peft/{n}": batch, f"ours/{n}": batch})
        # warm-up, and a check: random weights leave near-ties between logits, so float32
        # rounding may flip a greedy token; the logits themselves are checked in the tests
        peft_out, ours_out = cases[f"peft/{n}"](), cases[f"ours/{n}"]()
        agree[n] = (peft_out == ours_out).float().mean().item()
    for key in [k for k in cases if k.startswith("base/")]:
        cases[key]()  # warm-up

    # wall and CPU seconds per generate() call; with one thread, CPU time leaves out the time
    # this process waited for a core, which is most of the noise on a shared machine
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    keys = list(cases)
    for r in range(args.rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for key in order:
            w0, c0 = time.perf_counter(), time.process_time()
            out = cases[key]()
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
            assert out.shape[1] == NEW_TOKENS + 1
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(
        f"threads={args.threads} rounds={args.rounds} prompt_len={args.prompt_len} rank={args.rank}"
    )
    for label, t in (("wall", wall), ("cpu", cpu)):
        print(f"-- tokens/s by {label} time (medians over rounds); ratios: median of per-round")
        print(
            f"{'distinct':>8} {'batch':>5} {'base':>7} {'peft':>7} {'ours':>7} "
            f"{'peft/base':>9} {'ours/base':>9} {'tokens=':>7}"
        )
        for n in args.distinct:
            batch = 64 if n > 16 else 16
            b, p, o = t[f"base/b{batch}"], t[f"peft/{n}"], t[f"ours/{n}"]
            tok = batch * NEW_TOKENS
            p_ratio = statistics.median(bi / pi for bi, pi in zip(b, p, strict=True))
            o_ratio = statistics.median(bi / oi for bi, oi in zip(b, o, strict=True))
            print(
                f"{n:>8} {batch:>5} {tok / statistics.median(b):>7.1f} "
                f"{tok / statistics.median(p):>7.1f} {tok / statistics.median(o):>7.1f} "
                f"{p_ratio:>9.3f} {o_ratio:>9.3f} {agree[n]:>7.3f}"
            )
        for variant, what in (("planned", "with a reused plan"), ("bf16", "with bf16 stacks")):
            if f"{variant}/{args.distinct[0]}" not in t:
                continue
            for n in args.distinct:
                batch = 64 if n > 16 else 16
                b, o = t[f"base/b{batch}"], t[f"{variant}/{n}"]
                ratio = statistics.median(bi / oi for bi, oi in zip(b, o, strict=True))
                print(f"{n:>8} distinct: ours {what} / base {ratio:.3f}")
        if args.gathered:
            for n in args.distinct:
                o, g = t[f"ours/{n}"], t[f"gathered/{n}"]
                ratio = statistics.median(gi / oi for gi, oi in zip(g, o, strict=True))
                print(f"{n:>8} distinct: ours / gathered-only (tokens/s) {ratio:.3f}")


if __name__ == "__main__":
    main()
