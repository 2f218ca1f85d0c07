"""Server throughput with batching on vs off, and adapter load latency on a large base.

Part 1: real uvicorn processes (`lorag serve`), one per variant, all up at once: `step`
(max_batch_size 16, step-level batching: rows join and leave between decoding steps), `whole`
(max_batch_size 16, LORAG_STEP_BATCHING=false: each batch decodes to its longest answer) and
`single` (max_batch_size 1); --variants picks some. 16 concurrent clients send a fixed number
of /ask requests to one server, then to the next, in rotating order for --rounds rounds
(interleaved, so machine load drifts hit all). Prints throughput and p50/p99 latency per run and
overall, then each variant's throughput ratio to `single` and, last, step/whole. With --rate,
the requests come open loop instead (Poisson arrivals at that rate, the same arrival times for
every variant in a round), which is where latency percentiles compare fairly: closed-loop
clients of whole batches start and end together.
The generator is a T5-small-shaped model with random weights (d_model 512, 6+6 layers,
d_ff 2048, 8 heads; ByT5's byte vocabulary, so 259 tokens instead of 32k) unless
--generator names another (`default` = the packaged SmolLM2-135M, slow on 2 shared cores).
The random model greedily decodes PAD at every step, never EOS: every request takes exactly
--max-new-tokens decoding steps, and its answer is an empty string.

Part 2 (--load-latency): a rank-16 LoRA adapter (q, v; PEFT's T5 default) loaded into a
T5-large-shaped base (d_model 1024, 24+24 layers, d_ff 4096, 16 heads, 737M params; weights left
uninitialized, which loading an adapter never reads) through the registry: prepare (read,
hash, validate; off the model thread) and install (on the model thread, blocking batches)
timed separately, p50 over --loads loads, unloading between loads.

Part 4 (--ceiling): what batching can give this workload at most, in one process with no
server: --clients rows (demo passages, top_k 1, the same generator and --max-new-tokens) in one
Generator.generate call vs one call per row, alternating for --rounds rounds; the ratio of the
two times is the throughput the server could reach with perfect batches.

Part 3 (--cycles N): N load/unload cycles of one adapter through the registry on a tiny T5
(d_model 32, 2+2 layers); prints RSS and the model's parameter count before and after (the test
suite runs 200 cycles; this is the 1,000-cycle version).

    .venv/bin/python -m bench.serve_throughput [--requests 64] [--rounds 2] [--variants ...]
    .venv/bin/python -m bench.serve_throughput --rate 0.6 --variants step,whole ...
    .venv/bin/python -m bench.serve_throughput --load-latency [--loads 5]
    .venv/bin/python -m bench.serve_throughput --cycles 1000
    .venv/bin/python -m bench.serve_throughput --ceiling [--clients 12] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

log = logging.getLogger("bench.serve_throughput")

QUESTIONS = [
    "What is the capital of Alaska?",
    "What does ASCII stand for?",
    "Who wrote the first compiler?",
    "How does a glacier form?",
    "What is albedo?",
    "Why does sourdough rise?",
    "What is a pendulum clock?",
    "How does a piano make sound?",
]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def t5_small_shaped(out: Path) -> Path:
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=259,
        d_model=512,
        d_ff=2048,
        d_kv=64,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    cfg.decoder_start_token_id = 0  # an extra attribute: not a declared T5Config field
    T5ForConditionalGeneration(cfg).eval().save_pretrained(out)
    ByT5Tokenizer(extra_ids=0).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(
    generator: str, max_batch: int, max_new_tokens: int, wait_ms: float, *, steps: bool = True
) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LORAG_PORT": str(port),
        "LORAG_LOG_LEVEL": "warning",
        "LORAG_GENERATOR": generator,
        "LORAG_MAX_BATCH_SIZE": str(max_batch),
        "LORAG_BATCH_WAIT_MS": str(wait_ms),
        "LORAG_MAX_NEW_TOKENS": str(max_new_tokens),
        "LORAG_STEP_BATCHING": "true" if steps else "false",
    }
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server (max_batch_size {max_batch}) did not become ready")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


class _Asks:
    """Latencies (ms) and answer tokens (end token included) of the /ask calls made."""

    def __init__(self, url: str, top_k: int) -> None:
        self.url, self.top_k = url, top_k
        self.latencies: list[float] = []
        self.lengths: list[int] = []

    async def ask(self, ac: httpx.AsyncClient, i: int) -> None:
        body = {"question": QUESTIONS[i % len(QUESTIONS)], "top_k": self.top_k}
        t = time.perf_counter()
        r = await ac.post(f"{self.url}/ask", json=body)
        r.raise_for_status()
        self.latencies.append((time.perf_counter() - t) * 1000)
        self.lengths.append(int(r.json()["generated_tokens"]))


async def load(
    url: str, requests: int, clients: int, top_k: int
) -> tuple[float, list[float], list[int]]:
    """Wall seconds for `requests` /ask calls from `clients` concurrent clients, latencies ms,
    and the tokens each answer took (end token included)."""
    asks = _Asks(url, top_k)
    counter = iter(range(requests))

    async def client(ac: httpx.AsyncClient) -> None:
        for i in counter:
            await asks.ask(ac, i)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as ac:
        await ac.post(f"{url}/ask", json={"question": QUESTIONS[0], "top_k": top_k})  # warm
        started = time.perf_counter()
        await asyncio.gather(*(client(ac) for _ in range(clients)))
        wall = time.perf_counter() - started
    return wall, asks.latencies, asks.lengths


async def open_loop(
    url: str, requests: int, rate: float, top_k: int, seed: int
) -> tuple[float, list[float], list[int]]:
    """Requests sent at Poisson arrivals of `rate` per second whatever the answers (open loop,
    as independent users send them); wall seconds until the last answer, latencies ms, tokens."""
    gaps = random.Random(seed)
    asks = _Asks(url, top_k)

    async with httpx.AsyncClient(timeout=1200, limits=httpx.Limits(max_connections=None)) as ac:
        await ac.post(f"{url}/ask", json={"question": QUESTIONS[0], "top_k": top_k})  # warm
        started = time.perf_counter()
        tasks = []
        for i in range(requests):
            tasks.append(asyncio.create_task(asks.ask(ac, i)))
            await asyncio.sleep(gaps.expovariate(rate))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    return wall, asks.latencies, asks.lengths


def batch_rows(url: str) -> tuple[float, float]:
    """(rows, batches) the server has generated so far, from its /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(("lorag_batch_rows_sum", "lorag_batch_rows_count")):
            key, value = line.split()
            values[key] = float(value)
    return values["lorag_batch_rows_sum"], values["lorag_batch_rows_count"]


VARIANTS = {"step": (16, True), "whole": (16, False), "single": (1, False)}


def throughput(args: argparse.Namespace) -> None:
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    with ExitStack() as stack:
        generator = args.generator
        if generator is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            generator = str(t5_small_shaped(tmp / "t5-small-shaped"))
        urls = {}
        for name in names:
            b, steps = VARIANTS[name]
            wait = args.batch_wait_ms if b > 1 else 0
            urls[name] = stack.enter_context(
                server(generator, b, args.max_new_tokens, wait, steps=steps)
            )
        walls: dict[str, list[float]] = {n: [] for n in names}
        lats: dict[str, list[float]] = {n: [] for n in names}
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                rows0, batches0 = batch_rows(urls[name])
                if args.rate:  # the same arrival times for every variant in a round
                    run = open_loop(urls[name], args.requests, args.rate, args.top_k, seed=rnd)
                else:
                    run = load(urls[name], args.requests, args.clients, args.top_k)
                wall, lat, lens = asyncio.run(run)
                rows1, batches1 = batch_rows(urls[name])
                mean_rows = (rows1 - rows0) / max(1.0, batches1 - batches0)
                walls[name].append(wall)
                lats[name].extend(lat)
                print(
                    f"round {rnd} {name:6s}: {args.requests / wall:6.2f} req/s  "
                    f"p50 {pct(lat, 50):7.0f} ms  p99 {pct(lat, 99):7.0f} ms  "
                    f"mean admitted together {mean_rows:4.1f} rows  "
                    f"mean answer {statistics.mean(lens):.1f} tokens (max {max(lens)})",
                    flush=True,
                )
    rates = {n: [args.requests / w for w in walls[n]] for n in names}
    for name in names:
        print(
            f"{name:6s}: median {statistics.median(rates[name]):6.2f} req/s  "
            f"p50 {pct(lats[name], 50):7.0f} ms  p99 {pct(lats[name], 99):7.0f} ms"
        )

    def ratio(a: str, b: str) -> str:
        per_round = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in per_round)
        return f"throughput ratio {a}/{b}: {statistics.median(per_round):.2f}x ({rounds})"

    if "single" in names:
        for name in names:
            if name != "single":
                print(ratio(name, "single"))
    if "step" in names and "whole" in names:
        print(ratio("step", "whole"))


def ceiling(args: argparse.Namespace) -> None:
    import json

    import torch

    from app.contracts import GenRow, Passage
    from app.generation.loading import load_generator

    torch.set_num_threads(int(os.environ.get("LORAG_TORCH_THREADS", "0")) or 1)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.generator or str(t5_small_shaped(Path(tmp) / "t5-small-shaped"))
        gen = load_generator(model, cache_dir=Path(tmp))
        with Path("index/sources/demo.jsonl").open(encoding="utf-8") as source:
            docs = [json.loads(line) for _, line in zip(range(args.clients), source, strict=False)]
        rows = [
            GenRow(
                QUESTIONS[i % len(QUESTIONS)],
                [Passage(f"{d['id']}#0", d["id"], d["title"], d["text"][:600])],
                None,
                args.max_new_tokens,
            )
            for i, d in enumerate(docs)
        ]
        gen.generate(rows[:2])  # warm-up
        ratios = []
        for rnd in range(args.rounds):
            t = time.perf_counter()
            gen.generate(rows)
            batched = time.perf_counter() - t
            t = time.perf_counter()
            for row in rows:
                gen.generate([row])
            single = time.perf_counter() - t
            ratios.append(single / batched)
            print(
                f"round {rnd}: {len(rows)} rows in one call {batched:.1f} s, "
                f"one by one {single:.1f} s",
                flush=True,
            )
    print(f"batching ceiling (one call / one by one): {statistics.median(ratios):.2f}x")


def load_latency(args: argparse.Namespace) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration
    from transformers.initialization import no_init_weights

    from app.generation.generator import Generator
    from app.lora.registry import AdapterRegistry

    cfg = T5Config(
        vocab_size=32128,
        d_model=1024,
        d_ff=4096,
        d_kv=64,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        pad_token_id=0,
        eos_token_id=1,
    )
    cfg.decoder_start_token_id = 0  # an extra attribute: not a declared T5Config field
    t = time.perf_counter()
    with no_init_weights():
        model = T5ForConditionalGeneration(cfg).eval()
    model.tie_weights()  # shared input/output embeddings, as T5 (v1.0) has
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t
    print(f"T5-large-shaped base: {params / 1e6:.0f}M params, built in {built:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
        peft = get_peft_model(model, lora)
        peft.save_pretrained(str(root / "r16"))
        model = peft.unload()  # the plain base again
        size = (root / "r16" / "adapter_model.safetensors").stat().st_size
        gen = Generator(
            model,
            ByT5Tokenizer(extra_ids=0),
            model_id="t5-large-shaped",
            device=torch.device("cpu"),
        )
        reg = AdapterRegistry(gen, root)
        prep_ms, inst_ms, unload_ms = [], [], []
        for _ in range(args.loads):
            t = time.perf_counter()
            prepared = reg.prepare("r16")
            t1 = time.perf_counter()
            reg.install("a", prepared)
            t2 = time.perf_counter()
            reg.unload("a")
            t3 = time.perf_counter()
            prep_ms.append((t1 - t) * 1000)
            inst_ms.append((t2 - t1) * 1000)
            unload_ms.append((t3 - t2) * 1000)
        print(f"rank-16 adapter (q,v): {size / 1e6:.1f} MB file, {args.loads} loads")
        print(
            f"prepare p50 {statistics.median(prep_ms):.0f} ms, install p50 "
            f"{statistics.median(inst_ms):.0f} ms (model thread), unload p50 "
            f"{statistics.median(unload_ms):.0f} ms"
        )
        print(
            f"load latency p50 (prepare + install): "
            f"{statistics.median(p + i for p, i in zip(prep_ms, inst_ms, strict=True)):.0f} ms"
        )


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def cycle_memory(args: argparse.Namespace) -> None:
    import gc

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    from app.generation.generator import Generator
    from app.lora.registry import AdapterRegistry

    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=259, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    cfg.decoder_start_token_id = 0  # an extra attribute: not a declared T5Config field
    model = T5ForConditionalGeneration(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lora = LoraConfig(r=8, init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
        peft = get_peft_model(model, lora)
        peft.save_pretrained(str(root / "a"))
        model = peft.unload()
        gen = Generator(
            model, ByT5Tokenizer(extra_ids=0), model_id="tiny-t5", device=torch.device("cpu")
        )
        reg = AdapterRegistry(gen, root)
        prepared = reg.prepare("a")
        params = sum(p.numel() for p in gen.model.parameters())

        def cycles(n: int) -> None:
            for _ in range(n):
                reg.install("a", prepared)
                reg.unload("a")
            gc.collect()

        cycles(20)  # warm-up: allocator pools, PEFT's caches
        before = rss_bytes()
        t = time.perf_counter()
        cycles(args.cycles)
        took = time.perf_counter() - t
        after = rss_bytes()
        params_after = sum(p.numel() for p in gen.model.parameters())
    each_ms = took / args.cycles * 1000
    growth = (after / before - 1) * 100
    print(f"{args.cycles} load/unload cycles in {took:.1f} s ({each_ms:.1f} ms each)")
    print(f"RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({growth:+.2f}%)")
    print(f"parameters {params} -> {params_after}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64, help="requests per run")
    ap.add_argument("--variants", default="step,whole,single", help="servers to compare")
    ap.add_argument(
        "--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second"
    )
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="the batched server's")
    ap.add_argument("--generator", default=None, help="default: a T5-small-shaped random model")
    ap.add_argument("--load-latency", action="store_true", help="only the adapter load part")
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=0, help="only the load/unload memory part")
    ap.add_argument("--ceiling", action="store_true", help="only the in-process batching ceiling")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.ceiling:
        ceiling(args)
    elif args.cycles:
        cycle_memory(args)
    elif args.load_latency:
        load_latency(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
