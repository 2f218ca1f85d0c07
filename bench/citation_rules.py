"""Citation-check rules compared on answers the server gave with the check off.

The server's rule (app/generation/citations.py): a mark stands when its passage holds at least
half of its claim's content words, or as many as any passage; otherwise it names the passage
holding the most. The alternative read here, `plurality`, moves a mark whenever another
passage holds more (`stands=1.0`). Both run the module's own class on the same answers and
passages, from
bench/answer_quality.py's --json, so the comparison costs no generation:

    .venv/bin/python -m bench.answer_quality --adapters cited --check-citations false \
        --json /tmp/aq_off.json
    .venv/bin/python -m bench.citation_rules /tmp/aq_off.json
    .venv/bin/python -m bench.citation_rules /tmp/aq_train_off.json --split train

For each rule: how often the marks name the passage that holds the reference answer (among
answerable questions whose passage was retrieved and that were not abstained), the same among
right answers, the marks moved, and of those how many moved onto / off that passage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.generation.citations import CitationCheck
from bench.answer_quality import normalize, read

# each rule's `stands` (CitationCheck): the share of a claim that keeps its mark; None: no check
RULES: dict[str, float | None] = {
    "none": None,
    "plurality": 1.0,
    "half (the server's)": 0.5,
}


def compare(answerable: list[dict[str, Any]], outs: list[dict[str, Any]]) -> None:
    for name, rule in RULES.items():
        cites = total = right = right_cites = moved = onto = off = 0
        for q, out in zip(answerable, outs, strict=True):
            if out.get("abstained"):
                continue
            answer = out["answer"]
            if rule is not None:
                check = CitationCheck(
                    [(p["title"], p["text"]) for p in out["passages"]],
                    [p["score"] for p in out["passages"]],
                    stands=rule,
                )
                checked = check(answer)
                answer, moved = checked.text, moved + checked.moved
            ids = [p["id"] for p in out["passages"]]
            if q["passage_id"] not in ids:
                continue
            gold = f"[{ids.index(q['passage_id']) + 1}]"
            before, after = gold in out["answer"], gold in answer
            is_right = normalize(q["answer"]) in normalize(out["answer"])
            total += 1
            cites += after
            right += is_right
            right_cites += is_right and after
            onto += after and not before
            off += before and not after
        print(
            f"{name:20s} cites the answer's passage {cites}/{total} = {cites / total:.3f}; "
            f"among right answers {right_cites}/{right} = {right_cites / max(right, 1):.3f}; "
            f"marks moved {moved} (onto it {onto}, off it {off})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="bench.answer_quality --json, check off")
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout")
    args = parser.parse_args()
    answerable = read(f"answerable_{args.split}.jsonl")
    for key, run in json.loads(args.json.read_text()).items():
        print(key)
        outs = run["answerable"]
        if any(o.get("citations_moved") for o in outs):
            raise SystemExit(f"{key}: these answers were checked already (run with the check off)")
        compare(answerable[: len(outs)], outs)


if __name__ == "__main__":
    main()
