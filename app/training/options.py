"""What `lorag adapter train` is asked to do, validated before any file or model is touched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.contracts import MODES, Mode
from app.errors import InvalidInputError
from app.lora.registry import check_name

Objective = Mode
OBJECTIVES: tuple[Objective, ...] = MODES


@dataclass(frozen=True)
class TrainOptions:
    data: Path
    name: str
    base: str = "default"  # generator spec: "default", a hub id or a local folder
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str = "attention"  # attention | all-linear | a,b,c
    last_layers: int | None = None  # LoRA only in the last N blocks (cheaper backward)
    epochs: int = 1
    lr: float = 3e-4
    batch_size: int = 4
    top_k: int = 5
    objective: Objective = "concat"
    seed: int = 0
    heldout: float = 0.1
    qlora: bool = False
    max_steps: int | None = None
    max_answer_chars: int = 1000
    eval_max_new_tokens: int | None = None  # greedy answers at evaluation; None: from answers,
    # 0: loss only
    force: bool = False  # replace an existing adapter folder
    # question-encoder LoRA (app/training/question.py), trained through the retrieval scores
    question_encoder: bool = False
    question_lr: float | None = None  # None: lr
    question_target_modules: str = "query,value"  # the encoder transformer's layers to adapt
    question_last_layers: int | None = None
    candidates: int = 20  # passages per question the top_k are re-picked from at each step

    def __post_init__(self) -> None:
        check_name(self.name)
        positive = {"rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size}
        positive |= {"top_k": self.top_k, "max_answer_chars": self.max_answer_chars}
        positive["candidates"] = self.candidates
        for key, value in positive.items():
            if value < 1:
                raise InvalidInputError(f"{key} must be at least 1, got {value}")
        optional = {"max_steps": self.max_steps, "last_layers": self.last_layers}
        optional["question_last_layers"] = self.question_last_layers
        for key, opt in optional.items():
            if opt is not None and opt < 1:
                raise InvalidInputError(f"{key} must be at least 1, got {opt}")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 0:
            raise InvalidInputError(
                f"eval_max_new_tokens must be >= 0, got {self.eval_max_new_tokens}"
            )
        if self.alpha <= 0 or self.lr <= 0:
            raise InvalidInputError(f"alpha and lr must be positive, got {self.alpha}, {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.heldout < 1.0:
            raise InvalidInputError(f"heldout must be in [0, 1), got {self.heldout}")
        if self.objective not in OBJECTIVES:
            raise InvalidInputError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        if not self.target_modules.strip(" ,"):
            raise InvalidInputError("target_modules is empty")
        if self.question_encoder:
            self._check_question()

    def _check_question(self) -> None:
        if self.objective == "concat":
            raise InvalidInputError(
                "--question-encoder needs --objective token or sequence: with concat the "
                "retrieval scores p(z|x) do not enter the loss, so the question encoder would "
                "get no gradient"
            )
        if self.candidates < self.top_k:
            raise InvalidInputError(
                f"candidates ({self.candidates}) must be at least top_k ({self.top_k})"
            )
        if self.question_lr is not None and self.question_lr <= 0:
            raise InvalidInputError(f"question_lr must be positive, got {self.question_lr}")
        if not self.question_target_modules.strip(" ,"):
            raise InvalidInputError("question_target_modules is empty")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data"] = str(self.data)
        return out
