"""Prompt text for the generator: the question with its numbered, titled passages.

Seq2seq models get T5's QA format, "question: ... context: [1] title: text [1] ...". Causal
models get a system + user chat message when their tokenizer has a chat template, plain text
otherwise.

Each passage opens and closes with its number, "[n] title: text [n]", so the mark a citation
repeats also sits right after the text it cites (a passage is ~130 tokens, and the passages of
one article share a title). The `cited` demo adapter, retrained on this layout, cites the
passage holding the answer in 0.78 of held-out answers against 0.68 with the number in front
only, for ~3 more prompt tokens a passage (bench/RESULTS.md, "Passages that close with their
number").

Passages arrive in retrieval order and are fitted to a token budget in that order: whole
passages while they fit, then the first that does not fit is cut to the room left (if that room
is worth having), and the rest are dropped. The top-ranked passages are the ones most likely to
hold the answer, so cutting from the bottom loses the least; an equal share each would cut every
passage.

The passages kept are then laid out in the prompt order (PromptConfig.concat_order, one sort key
here, `prompt_order`): "score" keeps retrieval order; "stable" sorts them by document, then
ordinal, so two questions retrieving overlapping passage sets in another order share a longer
token prefix, which the prefix KV cache reuses (app/generation/prefix_cache.py). Each passage
is numbered [n] by its place in that order among all the passages given, kept or not, which is
the order the service lists them in its answer (app/service.py), so a citation [n] names the
answer's n-th passage whichever order is set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from app.contracts import GeneratorKind, Passage, Turn
from app.generation.config import ConcatOrder

log = logging.getLogger(__name__)
T = TypeVar("T")

SYSTEM = (
    "Answer the question using the numbered passages. "
    "Reply with a short answer; if the passages do not contain it, say you do not know."
)
MIN_PASSAGE_TOKENS = 16  # a cut passage shorter than this carries too little to keep
MARGIN_TOKENS = 8  # re-tokenizing decoded text is not exactly additive; keep slack


def passage_block(number: int, passage: Passage, text: str | None = None) -> str:
    body = passage.text if text is None else text
    head = f"[{number}] {passage.title}: " if passage.title else f"[{number}] "
    return f"{head}{body} [{number}]"


def stable_key(passage: Passage) -> tuple[str, int, str]:
    """(document, ordinal, id): a document's passages together, in reading order. Ids are
    "<doc_id>#<ordinal>"; an id of another form sorts by itself after its document's."""
    _, _, tail = passage.id.rpartition("#")
    return (passage.doc_id, int(tail) if tail.isdigit() else 1 << 62, passage.id)


def prompt_order(items: Sequence[T], passages: Sequence[Passage], order: ConcatOrder) -> list[T]:
    """items (one per passage, in retrieval order) in the order a concat prompt lays out and
    numbers their passages."""
    if order == "score":
        return list(items)
    ranks = sorted(range(len(passages)), key=lambda i: stable_key(passages[i]))
    return [items[i] for i in ranks]


class PromptBuilder:
    """Renders (question, passages) into one prompt string that fits max_tokens."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, kind: GeneratorKind, order: ConcatOrder = "score"
    ) -> None:
        self.tokenizer = tokenizer
        self.kind = kind
        self.order: ConcatOrder = order
        self.chat = kind == "causal" and bool(getattr(tokenizer, "chat_template", None))

    def n_tokens(self, text: str) -> int:
        return len(self._ids(text))

    def _ids(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return ids

    def render(self, question: str, blocks: Sequence[str], history: Sequence[Turn] = ()) -> str:
        """The prompt for already-formatted passage blocks, after the conversation so far (a
        client's system messages join lorag's); no budgeting."""
        if self.kind == "seq2seq":
            past = " ".join(f"{role}: {text}" for role, text in history)
            head = f"history: {past} " if past else ""
            return f"{head}question: {question} context: {' '.join(blocks)}"
        context = "\n".join(blocks)
        user = f"Passages:\n{context}\n\nQuestion: {question}"
        system = SYSTEM + "".join(f"\n\n{text}" for role, text in history if role == "system")
        turns = [(role, text) for role, text in history if role != "system"]
        if self.chat:
            return self._with_system(system, [*turns, ("user", user)])
        past = "".join(f"{role.capitalize()}: {text}\n\n" for role, text in turns)
        return f"{system}\n\n{past}{user}\nAnswer:"

    def conversation(self, question: str, history: Sequence[Turn]) -> str:
        """The conversation as the client sent it, then the question: no passages, no RAG
        instructions (a chat request without retrieval)."""
        turns = [*history, ("user", question)]
        if self.chat:
            system = "\n\n".join(text for role, text in turns if role == "system")
            rest = [(role, text) for role, text in turns if role != "system"]
            return self._with_system(system, rest) if system else self._messages(rest)
        lines = "".join(f"{role.capitalize()}: {text}\n\n" for role, text in turns)
        return f"{lines}Assistant:" if self.kind == "causal" else lines.strip()

    def _with_system(self, system: str, turns: Sequence[Turn]) -> str:
        try:
            return self._messages([("system", system), *turns])
        except TemplateError:  # templates that refuse a system turn (Gemma, early Mistral)
            first = next(i for i, (role, _) in enumerate(turns) if role == "user")
            role, text = turns[first]
            merged = [*turns[:first], (role, f"{system}\n\n{text}"), *turns[first + 1 :]]
            return self._messages(merged)

    def _messages(self, turns: Sequence[Turn]) -> str:
        return self._chat([{"role": role, "content": text} for role, text in turns])

    def _chat(self, messages: list[dict[str, str]]) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert isinstance(text, str)
        return text

    def build(
        self,
        question: str,
        passages: Sequence[Passage],
        max_tokens: int,
        history: Sequence[Turn] = (),
    ) -> str:
        """The prompt with as many passages (chosen in retrieval order) as fit in max_tokens
        tokens, laid out and numbered in the prompt order. A conversation longer than half the
        budget loses its oldest turns first (system messages stay); then passages are cut from
        the bottom of the retrieval order, as without one."""
        question = self._fit_question(question, max_tokens)
        history = self._fit_history(question, list(history), max_tokens)
        room = max_tokens - self.n_tokens(self.render(question, [], history)) - MARGIN_TOKENS
        laid_out = prompt_order(range(len(passages)), passages, self.order)
        numbers = {i: n for n, i in enumerate(laid_out, start=1)}  # passage index -> [n]
        kept: dict[int, str] = {}  # the prompt number of each passage kept: its block
        for i, passage in enumerate(passages):
            number = numbers[i]
            block = passage_block(number, passage)
            cost = self.n_tokens(block) + 1  # +1: the separator between blocks
            if cost <= room:
                kept[number] = block
                room -= cost
                continue
            head = self.n_tokens(passage_block(number, passage, "")) + 1
            keep = room - head
            if keep >= MIN_PASSAGE_TOKENS:
                text = str(self.tokenizer.decode(self._ids(passage.text)[:keep]))
                kept[number] = passage_block(number, passage, text)
            log.debug(
                "prompt budget %d tokens: kept %d of %d passages (passage %d cut to %d tokens)",
                max_tokens,
                len(kept),
                len(passages),
                number,
                max(keep, 0),
            )
            break
        return self.render(question, [kept[n] for n in sorted(kept)], history)

    def _fit_history(self, question: str, history: list[Turn], max_tokens: int) -> list[Turn]:
        dropped = 0
        while self.n_tokens(self.render(question, [], history)) > max_tokens // 2:
            oldest = next((i for i, (role, _) in enumerate(history) if role != "system"), None)
            if oldest is None:
                break
            del history[oldest]
            dropped += 1
        if dropped:
            log.warning(
                "conversation over half the prompt budget: dropped %d oldest turns", dropped
            )
        return history

    def _fit_question(self, question: str, max_tokens: int) -> str:
        """A question longer than half the budget is cut to half (its start is kept)."""
        ids = self._ids(question)
        if len(ids) <= max_tokens // 2:
            return question
        log.warning("question of %d tokens cut to %d", len(ids), max_tokens // 2)
        return str(self.tokenizer.decode(ids[: max_tokens // 2]))
