"""lm-eval's loglikelihoods through /v1/completions against transformers' own, sample by sample.

Reads the multiple-choice samples that `lm_eval --log_samples` wrote for the base model and for
an adapter, recomputes each choice's log p(continuation | context) with a direct forward pass
(PEFT for the adapter) of the same converted default generator, and prints the largest
difference per model: 0 means the served scores are the model's.

    .venv/bin/python -m bench.lm_eval_reference --samples /tmp/lmeval_out [--adapter concise]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.generation.loading import prepare_default_generator
from app.settings import Settings


def worst_gap(model: torch.nn.Module, tok: object, samples: Path) -> tuple[float, int]:
    worst, n = 0.0, 0
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        ctx = "Question: " + s["doc"]["question"] + "\nAnswer:"
        for choice, resp in zip(s["doc"]["choices"], s["resps"], strict=True):
            cids = tok(ctx)["input_ids"]  # type: ignore[operator]
            full = tok(ctx + " " + choice)["input_ids"]  # type: ignore[operator]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([full])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)  # [L, V]: row t-1 predicts token t
            ref = sum(float(lp[t - 1, full[t]]) for t in range(len(cids), len(full)))
            worst, n = max(worst, abs(ref - float(resp[0][0]))), n + 1
    return worst, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=Path, default=Path("/tmp/lmeval_out"))
    ap.add_argument("--adapter", default="concise", help="a folder under adapters/")
    args = ap.parse_args()
    folder = prepare_default_generator(Settings().cache_dir)
    tok = AutoTokenizer.from_pretrained(folder)
    for name, adapter in (
        ("HuggingFaceTB__SmolLM2-135M-Instruct", None),
        (args.adapter, args.adapter),
    ):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, Path("adapters") / adapter).eval()
        samples = sorted((args.samples / name).glob("samples_lorag_demo_mc_*.jsonl"))[-1]
        gap, n = worst_gap(model, tok, samples)
        print(f"{name}: max |lm-eval via /v1 - transformers| over {n} loglikelihoods: {gap:.2e}")


if __name__ == "__main__":
    main()
