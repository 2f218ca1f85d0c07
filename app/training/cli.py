"""`lorag adapter train`: the argument parser and the command.

app/cli.py wires it in with `add_train_parser(acts, config)` on the `adapter` subparser group,
`config` making the TrainingConfig (from the settings) when the command runs. It also runs
alone: `python -m app.training.cli --data FILE --name NAME ...`, which is `lorag adapter train`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.errors import LoragError
from app.training.config import TrainingConfig
from app.training.options import OBJECTIVES, TrainOptions

log = logging.getLogger(__name__)


def _add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data", required=True, type=Path, help="JSONL of question/answer[/passages]")
    s.add_argument("--name", required=True, help="adapter folder name under the adapters root")
    s.add_argument("--base", help="generator spec (default: the configured LORAG_GENERATOR)")
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--alpha", type=float, default=16.0)
    s.add_argument("--dropout", type=float, default=0.05)
    s.add_argument(
        "--target-modules",
        default="attention",
        help="attention | all-linear | comma-separated layer names (q_proj,v_proj)",
    )
    s.add_argument(
        "--last-layers",
        type=int,
        help="adapt only the last N blocks: a cheaper backward pass, and served, the prefix "
        "cache shares the blocks below them with the base and other such adapters",
    )
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--lr", type=float, default=3e-4)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--top-k", type=int, help="passages retrieved per question (default: settings)")
    s.add_argument("--objective", choices=OBJECTIVES, default="concat")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--heldout", type=float, default=0.1, help="fraction held out for evaluation")
    s.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes)")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--max-answer-chars", type=int, default=1000)
    s.add_argument(
        "--eval-max-new-tokens", type=int, help="answer length at evaluation; 0 = loss only"
    )
    s.add_argument("--force", action="store_true", help="replace an existing adapter folder")
    q = s.add_argument_group("question-encoder adapter (trained jointly, through p(z|x))")
    q.add_argument(
        "--question-encoder",
        action="store_true",
        help="also train a LoRA on the question encoder (needs --objective token or sequence)",
    )
    q.add_argument("--question-lr", type=float, help="its learning rate (default: --lr)")
    q.add_argument("--question-target-modules", default="query,value")
    q.add_argument("--question-last-layers", type=int, help="adapt only its last N layers")
    q.add_argument(
        "--candidates",
        type=int,
        default=20,
        help="passages per question, fetched once; the top k are re-picked from them each step",
    )


def add_train_parser(subparsers: Any, config: Callable[[], TrainingConfig]) -> None:
    """Add `train` to the `adapter` subcommand group (an argparse subparsers action)."""
    s = subparsers.add_parser("train", help="train a LoRA adapter on a JSONL file")
    _add_arguments(s)
    s.set_defaults(func=lambda args: cmd_train(args, config()))


def options_from_args(args: argparse.Namespace, config: TrainingConfig) -> TrainOptions:
    return TrainOptions(
        data=args.data,
        name=args.name,
        base=args.base or config.base,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=args.target_modules,
        last_layers=args.last_layers,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        top_k=args.top_k or config.top_k,
        objective=args.objective,
        seed=args.seed,
        heldout=args.heldout,
        qlora=args.qlora,
        max_steps=args.max_steps,
        max_answer_chars=args.max_answer_chars,
        eval_max_new_tokens=args.eval_max_new_tokens,
        force=args.force,
        question_encoder=args.question_encoder,
        question_lr=args.question_lr,
        question_target_modules=args.question_target_modules,
        question_last_layers=args.question_last_layers,
        candidates=args.candidates,
    )


def cmd_train(args: argparse.Namespace, config: TrainingConfig) -> int:
    from app.training.train import train_adapter

    try:
        result = train_adapter(options_from_args(args, config), config)
    except LoragError as e:
        print(f"lorag: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorag: interrupted; no adapter was written", file=sys.stderr)
        return 130
    metrics = result.summary["metrics"]
    print(json.dumps({"adapter": str(result.path), **metrics}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`lorag adapter train ARGS`: the same command, its config from the same settings."""
    from app.cli import main as lorag

    return lorag(["adapter", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
