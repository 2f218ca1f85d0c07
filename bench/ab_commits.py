"""One bench, two checkouts, interleaved: is a change faster or slower than the commit before it?

Runs `python -m MODULE ARGS` in a checkout of the older commit (--base, with its own .venv, as
`make setup` leaves it) and in this one, alternately (base, here; here, base; ...) for --rounds
rounds, on the same machine in the same minutes, so that drift in the machine's load falls on
both. Each --metric (a regex whose first group is a number, searched in the bench's output)
is printed per run, then as medians, and last the ratio here/base per metric.

    git worktree add /tmp/before <commit> && (cd /tmp/before && make setup)
    .venv/bin/python -m bench.ab_commits --base /tmp/before --rounds 3 \\
        --metric 'step\\s*: median ([\\d.]+) tok/s' -- bench.step_batching --variants step
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path


def run(tree: Path, module: str, args: list[str], metrics: list[str]) -> list[float]:
    python = tree / ".venv" / "bin" / "python"
    out = subprocess.run(
        [str(python), "-m", module, *args], cwd=tree, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.exit(f"{module} failed in {tree}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    values = []
    for pattern in metrics:
        found = re.search(pattern, out.stdout)
        if found is None:
            sys.exit(f"no match for {pattern!r} in {tree}'s output:\n{out.stdout[-3000:]}")
        values.append(float(found.group(1)))
    return values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True, help="checkout of the older commit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--metric", action="append", required=True, help="regex, group 1 a number")
    ap.add_argument("module")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    trees = {"base": a.base.resolve(), "here": here}
    results: dict[str, list[list[float]]] = {"base": [], "here": []}
    for r in range(a.rounds):
        order = ["base", "here"] if r % 2 == 0 else ["here", "base"]
        for name in order:
            values = run(trees[name], a.module, a.args, a.metric)
            results[name].append(values)
            print(f"round {r + 1} {name}: {values}", flush=True)
    print(f"{a.module} {' '.join(a.args)}; base {trees['base']}; {a.rounds} rounds")
    for i, pattern in enumerate(a.metric):
        base = statistics.median(v[i] for v in results["base"])
        mine = statistics.median(v[i] for v in results["here"])
        print(f"{pattern}: base {base:.3f}, here {mine:.3f}")
    for i, pattern in enumerate(a.metric):
        base = statistics.median(v[i] for v in results["base"])
        mine = statistics.median(v[i] for v in results["here"])
        print(f"ratio here/base {pattern}: {mine / base:.3f}")


if __name__ == "__main__":
    main()
