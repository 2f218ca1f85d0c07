"""Training data: a JSON Lines file of {"question", "answer"[, "passages"]} records.

Everything is checked before any model loads, and every error names the file and the line, so
a typo in line 9,000 costs a second, not a model load and an epoch. `passages` is optional: a
list of strings or of {"title", "text"[, "score"]} objects. Records without it get their passages
from the configured index at training time (see train.py). A passage's `score` is its retrieval
score (the RAG document prior is the softmax of the scores); explicit passages without scores
get a uniform prior.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.contracts import Passage
from app.errors import InvalidInputError

MAX_ANSWER_CHARS = 1000  # a training answer longer than this is almost surely a data error
MAX_QUESTION_CHARS = 2000  # as Settings.max_question_chars: what /ask accepts
MAX_PASSAGES = 50


class TrainingDataError(InvalidInputError):
    """A training file that cannot be used; the message names the file and line."""

    def __init__(self, path: Path, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"training data {where}: {reason}")
        self.path = path
        self.line = line


@dataclass(frozen=True, slots=True)
class Example:
    question: str
    answer: str
    passages: tuple[Passage, ...] | None  # None: retrieve from the index
    scores: tuple[float, ...] | None  # retrieval scores of passages; None: uniform prior
    line: int  # 1-based line in the source file


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_examples(path: Path, *, max_answer_chars: int = MAX_ANSWER_CHARS) -> list[Example]:
    """Parse and validate every line of path; raises TrainingDataError at the first bad one."""
    if not path.is_file():
        raise TrainingDataError(path, None, "no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TrainingDataError(path, line, f"not UTF-8 (byte {e.start} of the file)") from e
    examples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            examples.append(_parse_line(path, number, raw, max_answer_chars))
    if not examples:
        raise TrainingDataError(path, None, "holds no examples")
    return examples


def _parse_line(path: Path, line: int, raw: str, max_answer_chars: int) -> Example:
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise TrainingDataError(path, line, f"not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise TrainingDataError(path, line, f"expected a JSON object, got {type(record).__name__}")
    question = _text_field(path, line, record, "question", MAX_QUESTION_CHARS)
    answer = _text_field(path, line, record, "answer", max_answer_chars)
    if "passages" not in record:
        return Example(question, answer, None, None, line)
    passages, scores = _parse_passages(path, line, record["passages"])
    return Example(question, answer, passages, scores, line)


def _text_field(path: Path, line: int, record: dict[str, Any], key: str, limit: int) -> str:
    if key not in record:
        raise TrainingDataError(path, line, f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise TrainingDataError(path, line, f"field {key!r} must be a non-empty string")
    if len(value) > limit:
        raise TrainingDataError(
            path, line, f"field {key!r} has {len(value)} characters; the limit is {limit}"
        )
    return value.strip()


def _parse_passages(
    path: Path, line: int, value: object
) -> tuple[tuple[Passage, ...], tuple[float, ...] | None]:
    if not isinstance(value, list) or not value:
        raise TrainingDataError(path, line, "'passages' must be a non-empty list")
    if len(value) > MAX_PASSAGES:
        raise TrainingDataError(path, line, f"{len(value)} passages; the limit is {MAX_PASSAGES}")
    passages: list[Passage] = []
    scores: list[float | None] = []
    for i, item in enumerate(value):
        where = f"passages[{i}]"
        title: object = ""
        score: float | None = None
        text: object = item
        if isinstance(item, dict):
            text, title = item.get("text"), item.get("title", "")
            raw_score = item.get("score")
            if not isinstance(title, str):
                raise TrainingDataError(path, line, f"{where}.title must be a string")
            if raw_score is not None:
                ok = isinstance(raw_score, int | float) and not isinstance(raw_score, bool)
                if not (ok and math.isfinite(raw_score)):
                    raise TrainingDataError(path, line, f"{where}.score must be a finite number")
                score = float(raw_score)
        elif not isinstance(item, str):
            raise TrainingDataError(path, line, f"{where} must be a string or an object")
        if not isinstance(text, str) or not text.strip() or not isinstance(title, str):
            raise TrainingDataError(path, line, f"{where} needs a non-empty 'text'")
        passages.append(Passage(id=f"line{line}#{i}", doc_id=f"line{line}", title=title, text=text))
        scores.append(score)
    given = [s for s in scores if s is not None]
    if given and len(given) != len(scores):
        raise TrainingDataError(path, line, "give a score for every passage or for none")
    return tuple(passages), (tuple(given) if given else None)


def split_heldout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, heldout): a seeded shuffle, the last ceil(fraction * n) held out.

    At least one example is held out when fraction > 0 and at least one is left to train on.
    """
    if not 0.0 <= fraction < 1.0:
        raise InvalidInputError(f"heldout fraction must be in [0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = min(math.ceil(fraction * len(examples)), len(examples) - 1) if fraction > 0 else 0
    cut = len(examples) - n_held
    return [examples[i] for i in order[:cut]], [examples[i] for i in order[cut:]]
