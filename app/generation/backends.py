"""Generator backends: an encoder-decoder (T5, FLAN-T5, BART) and a decoder-only model.

One abstract base holds what both share (the batched greedy call, per-row adapters, per-row
length limits, decoding); the two subclasses differ only in how prompts are tokenized and padded
and where the answer starts in the output. An ABC rather than a Protocol: the shared code is
most of the class, and a Protocol would make each backend repeat it.

Adapters are chosen per row with PEFT's `adapter_names` (never `set_adapter`, which is global
state shared by every request in the batch): each LoRA layer splits the batch by adapter name.
`model` is the plain transformers model until the adapter registry wraps it into a PeftModel.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from peft import PeftModel
from transformers import BatchEncoding, GenerationConfig, PreTrainedTokenizerBase

from app.contracts import BASE_ADAPTER, GeneratorKind, GenRow, Passage
from app.errors import AdapterNotFound
from app.generation.prompts import PromptBuilder
from app.lora.batched import BatchedLora

log = logging.getLogger(__name__)

BASE = BASE_ADAPTER
_HUGE = 1_000_000  # tokenizers say model_max_length=1e30 when they do not know


class Decoded(NamedTuple):
    text: str
    tokens: int  # tokens the model generated for it, its end-of-sequence token included


class Generator(ABC):
    kind: ClassVar[GeneratorKind]

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_id: str,
        device: torch.device,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        if tokenizer.pad_token is None:
            # decoder-only checkpoints often ship without one; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = self.padding_side
        self.prompts = PromptBuilder(tokenizer, self.kind)
        self.eos_ids = self._eos_ids()
        # stacked per-row LoRA for generate(), kept in step with the model by
        # sync_batched_lora (the adapter registry's on_change hook); None = PEFT's own path
        self.batched: BatchedLora | None = None

    padding_side: ClassVar[Literal["left", "right"]]

    # ---- what subclasses define -------------------------------------------------------

    @abstractmethod
    def max_input_tokens(self, max_new_tokens: int) -> int:
        """Longest prompt, in tokens, that leaves room for max_new_tokens of answer."""

    @abstractmethod
    def _tokenize(self, prompt: str, max_length: int) -> list[int]:
        """The prompt's input ids, at most max_length of them."""

    @abstractmethod
    def _answer_tokens(self, output: torch.Tensor, enc: BatchEncoding) -> torch.Tensor:
        """The generated tokens of generate()'s output: [B, T_new]."""

    # ---- public API ---------------------------------------------------------------------

    def prompt(self, question: str, passages: Sequence[Passage], max_new_tokens: int) -> str:
        return self.prompts.build(question, passages, self.max_input_tokens(max_new_tokens))

    def encode_pairs(
        self, question: str, passages: Sequence[Passage], *, reserve: int = 0
    ) -> BatchEncoding:
        """One prompt per (question, passage) pair, tokenized and padded for the model.

        Returns input_ids and attention_mask of shape [n_passages, L] on self.device (right
        padding for seq2seq, left for causal). `reserve` leaves that many tokens of the
        context window free (for the answer tokens a causal model scores after the prompt).
        """
        limit = self.max_input_tokens(reserve)
        prompts = [self.prompts.build(question, [p], limit) for p in passages]
        return self._encode(prompts, limit)

    def adapter_kwargs(self, adapters: Sequence[str | None]) -> dict[str, Any]:
        """Extra model kwargs that give row i the adapter adapters[i] (None = the base).

        Empty while no adapter is installed. Once the model is a PeftModel every call passes
        adapter_names, even all-base, because the PeftModel's active adapter would otherwise
        apply to every row. Raises AdapterNotFound for a name the model does not hold.
        """
        if not isinstance(self.model, PeftModel):
            for name in adapters:
                if name is not None:
                    raise AdapterNotFound(name)
            return {}
        installed = self.model.peft_config
        for name in adapters:
            if name is not None and name not in installed:
                raise AdapterNotFound(name)
        return {"adapter_names": [BASE if a is None else a for a in adapters]}

    def forward(self, adapters: Sequence[str | None], **inputs: Any) -> Any:
        """model(**inputs) with row i under adapters[i] (None = the base), no autograd.

        For scoring (RAG marginalization): pass input_ids/attention_mask (and decoder_input_ids
        for seq2seq); returns the model output with .logits.
        """
        with torch.inference_mode():
            return self.model(**inputs, **self.adapter_kwargs(adapters))

    def generate(self, rows: Sequence[GenRow]) -> list[str]:
        """Greedy answers for all rows (the texts of generate_decoded)."""
        return [d.text for d in self.generate_decoded(rows)]

    def generate_decoded(self, rows: Sequence[GenRow]) -> list[Decoded]:
        """Greedy answers for all rows, with token counts, in one batched model.generate call.

        Each row's prompt is fitted to that row's own budget, so its answer never depends on
        the other rows. Only when a causal batch's longest prompt plus its longest answer would
        overrun the context window is the batch split into calls that fit.
        """
        if not rows:
            return []
        self.adapter_kwargs([r.adapter for r in rows])  # refuse unknown adapters up front
        ids = [
            self._tokenize(
                self.prompt(r.question, r.passages, r.max_new_tokens),
                self.max_input_tokens(r.max_new_tokens),
            )
            for r in rows
        ]
        answers = [Decoded("", 0)] * len(rows)
        for group in self._groups([len(x) for x in ids], [r.max_new_tokens for r in rows]):
            done = self._generate_batch([ids[i] for i in group], [rows[i] for i in group])
            for i, decoded in zip(group, done, strict=True):
                answers[i] = decoded
        return answers

    def _generate_batch(self, ids: Sequence[list[int]], rows: Sequence[GenRow]) -> list[Decoded]:
        longest = max(r.max_new_tokens for r in rows)
        enc = self._pad(ids)  # [B, L]
        extra = self.adapter_kwargs([r.adapter for r in rows])
        # with stacked per-row LoRA attached, rows pick their adapters through it instead of
        # PEFT's adapter_names (1.2-2.2x faster on mixed batches: bench/RESULTS.md)
        rows_ctx: AbstractContextManager[None] = nullcontext()
        if self.batched is not None and "adapter_names" in extra:
            rows_ctx = self.batched.rows(extra.pop("adapter_names"))
        with torch.inference_mode(), rows_ctx:
            output = self._hf.generate(
                **enc, generation_config=self._greedy(longest), **extra
            )  # [B, *]
        new = self._answer_tokens(output, enc)  # [B, T <= longest]
        # Each row is cut at its own limit. Greedy decoding is prefix-consistent: step t of a
        # row depends only on that row's prompt and its tokens before t, so the first n tokens
        # of a longer run are exactly what a run with max_new_tokens=n would produce.
        return [self.decode_answer(new[i, : r.max_new_tokens]) for i, r in enumerate(rows)]

    def _groups(self, lengths: Sequence[int], new_tokens: Sequence[int]) -> list[list[int]]:
        """Row indices in batches whose longest prompt + longest answer fit the window.

        Normally one batch. Otherwise first-fit over rows by decreasing prompt length; every
        row fits alone, since its prompt was cut to leave room for its own answer.
        """
        everyone = list(range(len(lengths)))
        window = self._batch_window()
        if window is None or max(lengths) + max(new_tokens) <= window:
            return [everyone]
        groups: list[list[int]] = []
        for i in sorted(everyone, key=lambda j: -lengths[j]):
            for group in groups:
                if (
                    lengths[group[0]] + max(new_tokens[i], *(new_tokens[j] for j in group))
                    <= window
                ):
                    group.append(i)
                    break
            else:
                groups.append([i])
        log.debug(
            "batch of %d rows split into %d to fit %d tokens", len(lengths), len(groups), window
        )
        return [sorted(g) for g in groups]

    def _batch_window(self) -> int | None:
        """The bound on prompt + answer length of a batch; None when there is none."""
        return None

    def _encode(self, prompts: Sequence[str], max_length: int) -> BatchEncoding:
        """Tokenize and pad prompts into [B, L] input_ids and attention_mask on self.device."""
        return self._pad([self._tokenize(p, max_length) for p in prompts])

    def _pad(self, ids: Sequence[list[int]]) -> BatchEncoding:
        enc = self.tokenizer.pad({"input_ids": list(ids)}, padding=True, return_tensors="pt")
        return enc.to(self.device)

    # ---- shared helpers -------------------------------------------------------------------

    @property
    def _hf(self) -> Any:
        """The model as the duck-typed transformers/PEFT object it is (generate, config)."""
        return self.model

    def _greedy(self, max_new_tokens: int) -> GenerationConfig:
        cfg: GenerationConfig = copy.deepcopy(self._hf.generation_config)
        cfg.do_sample = False
        cfg.num_beams = 1
        cfg.temperature = None
        cfg.top_p = None
        cfg.top_k = None
        cfg.max_new_tokens = max_new_tokens
        cfg.max_length = None
        cfg.pad_token_id = self.tokenizer.pad_token_id
        return cfg

    def decode_answer(self, tokens: torch.Tensor) -> Decoded:
        """The text of generated tokens [T], cut at the first end-of-sequence token."""
        ids: list[int] = tokens.tolist()
        generated = len(ids)
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids, generated = ids[:i], i + 1  # what follows the end is padding
                break
        return Decoded(str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip(), generated)

    def _decode(self, tokens: torch.Tensor) -> str:
        return self.decode_answer(tokens).text

    def _eos_ids(self) -> set[int]:
        eos = getattr(self._hf.generation_config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _context_window(self) -> int | None:
        """Tokens the model can attend to, from the tokenizer or the config; None = unknown."""
        limits = [
            n
            for n in (
                getattr(self.tokenizer, "model_max_length", None),
                getattr(self.model.config, "max_position_embeddings", None),
                getattr(self.model.config, "n_positions", None),
            )
            if isinstance(n, int) and 0 < n < _HUGE
        ]
        return min(limits) if limits else None


class Seq2SeqGenerator(Generator):
    """AutoModelForSeq2SeqLM: the prompt goes to the encoder, the answer comes from the decoder."""

    kind = "seq2seq"
    padding_side = "right"
    DEFAULT_MAX_INPUT = 512  # T5's training length; relative positions leave no config limit

    def max_input_tokens(self, max_new_tokens: int) -> int:
        # the answer lives in the decoder, so it takes no room from the encoder input
        return self._context_window() or self.DEFAULT_MAX_INPUT

    def _tokenize(self, prompt: str, max_length: int) -> list[int]:
        ids: list[int] = self.tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
        return ids

    def _answer_tokens(self, output: torch.Tensor, enc: BatchEncoding) -> torch.Tensor:
        return output[:, 1:]  # drop decoder_start_token_id


class CausalGenerator(Generator):
    """AutoModelForCausalLM: the answer continues the prompt; prompts are padded on the left
    so that every row's next token sits in the last column."""

    kind = "causal"
    padding_side = "left"
    DEFAULT_CONTEXT = 2048

    def max_input_tokens(self, max_new_tokens: int) -> int:
        window = self._context_window() or self.DEFAULT_CONTEXT
        return max(window - max_new_tokens, window // 4)

    def _batch_window(self) -> int:
        return self._context_window() or self.DEFAULT_CONTEXT

    def forward(self, adapters: Sequence[str | None], **inputs: Any) -> Any:
        # With left padding a row's first real token must still be position 0. generate()
        # derives positions from the mask; a plain forward counts from the padded start,
        # which rotary models forgive (relative) but learned absolute positions (GPT-2) do not.
        mask = inputs.get("attention_mask")
        if mask is not None and "position_ids" not in inputs:
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
        return super().forward(adapters, **inputs)

    def _tokenize(self, prompt: str, max_length: int) -> list[int]:
        # A chat template writes its own special tokens. Plain text gets the tokenizer's (a BOS
        # for llama-style tokenizers), but not a trailing EOS: a prompt that ends the sequence
        # would make the model continue after an end. (T5-style tokenizers append one.)
        ids: list[int] = self.tokenizer(prompt, add_special_tokens=not self.prompts.chat)[
            "input_ids"
        ]
        if ids and not self.prompts.chat and ids[-1] == self.tokenizer.eos_token_id:
            ids = ids[:-1]
        return ids[-max_length:]  # the budget already fits; if not, keep the prompt's end

    def _answer_tokens(self, output: torch.Tensor, enc: BatchEncoding) -> torch.Tensor:
        return output[:, enc["input_ids"].shape[1] :]


def sync_batched_lora(generator: Generator, model: torch.nn.Module) -> None:
    """Keep generator.batched in step with the model the registry now serves (model thread).

    A PeftModel gets stacks (rebuilt after every change, since a hot swap keeps the set of
    names but not the weights); a plain model (no adapters, or one merged into the weights)
    gets none, and the patched layers are given PEFT's own forward back.
    """
    current = generator.batched
    if isinstance(model, PeftModel):
        if current is not None and current.model is model:
            current.refresh()
            return
        if current is not None:
            current.close()
        generator.batched = BatchedLora(model)
    elif current is not None:
        current.close()
        generator.batched = None
