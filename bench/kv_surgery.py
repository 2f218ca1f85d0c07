"""The step batch's join and leave on its KV cache (app/generation/kv.py), timed against
another version of the same module: a join merges new rows into the running ones, a leave
keeps all rows but one.

SmolLM2-135M-Instruct's cache shape (30 layers, 3 KV heads of 64, float32), --rows running
rows of --tokens columns, --joiners joining rows of the same width. Each round times both
modules in turn (A B, then B A), each arm a fresh state; medians, the ratio last.

    git show 661e067:app/generation/kv.py > /tmp/kv_before.py
    .venv/bin/python -m bench.kv_surgery --other /tmp/kv_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from transformers.cache_utils import DynamicCache

from app.generation import kv

LAYERS, HEADS, DIM = 30, 3, 64


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("kv_other", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def state(module: ModuleType, rows: int, tokens: int) -> kv.State:
    layers = [
        (torch.randn(rows, HEADS, tokens, DIM), torch.randn(rows, HEADS, tokens, DIM))
        for _ in range(LAYERS)
    ]
    s = module.State(
        DynamicCache(ddp_cache_data=layers),
        torch.ones(rows, tokens, dtype=torch.long),
        torch.zeros(rows, dtype=torch.long),
    )
    module.grow_in_place(s)
    return s


def once(module: ModuleType, rows: int, tokens: int, joiners: int) -> tuple[float, float]:
    """(seconds for a join, seconds for a leave)"""
    running, new = state(module, rows, tokens), state(module, joiners, tokens - 10)
    with torch.inference_mode():
        t0 = time.perf_counter()
        module.merge(running, new)
        t1 = time.perf_counter()
        keep = [i for i in range(running.rows) if i != rows // 2]
        module.select(running, keep)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path, required=True, help="another kv.py to time against")
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--joiners", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=460)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    arms = {"this": kv, "other": load(args.other)}
    times: dict[str, list[tuple[float, float]]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for name in list(arms)[:: 1 if r % 2 == 0 else -1]:
            times[name].append(once(arms[name], args.rows, args.tokens, args.joiners))
    print(
        f"rows={args.rows} joiners={args.joiners} tokens={args.tokens} rounds={args.rounds} "
        f"(cache {args.rows * args.tokens * LAYERS * 2 * HEADS * DIM * 4 / 2**20:.0f} MiB)"
    )
    med = {
        a: (statistics.median(j for j, _ in t), statistics.median(x for _, x in t))
        for a, t in times.items()
    }
    for a, (j, x) in med.items():
        print(f"{a:5s}: join {j * 1e3:7.1f} ms, leave {x * 1e3:7.1f} ms")
    print(
        f"this/other: join {med['this'][0] / med['other'][0]:.2f}x, "
        f"leave {med['this'][1] / med['other'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
