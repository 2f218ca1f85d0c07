"""The generator: a model, its tokenizer and its backend family, as the step batch needs it.

Prompts (app/generation/prompts.py) and tokenization by family (seq2seq.py, causal.py); per-row
adapters through PEFT's `adapter_names` (never `set_adapter`, which is global state shared by
every request in the batch); decoding through the step batch (`generate`), whose one second
path, transformers' generate() for models with logits processors, lives here
(`generate_whole`; see app/generation/step_batch.py for why).

`model` is the plain transformers model until the adapter registry wraps it into a PeftModel.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from peft import PeftModel
from transformers import BatchEncoding, GenerationConfig, PreTrainedTokenizerBase

from app.contracts import BASE_ADAPTER, GeneratorKind, GenRow, Passage, Turn
from app.errors import AdapterNotFound, InvalidInputError
from app.generation.config import PromptConfig
from app.generation.family import Family, family_for
from app.generation.prompts import PromptBuilder
from app.generation.step_batch import Decoded, decode
from app.lora.batched import BatchedLora

log = logging.getLogger(__name__)

_HUGE = 1_000_000  # tokenizers say model_max_length=1e30 when they do not know


class Generator:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_id: str,
        device: torch.device,
        prompt_config: PromptConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self.family: Family = family_for(model)
        if tokenizer.pad_token is None:
            # decoder-only checkpoints often ship without one; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = self.family.padding_side
        self.prompts = PromptBuilder(
            tokenizer, self.kind, (prompt_config or PromptConfig()).concat_order
        )
        self.eos_ids = self._eos_ids()
        self.pad_id = int(tokenizer.pad_token_id)
        # the one end token the RAG searches stop on: the tokenizer's (<|im_end|> for chat)
        eos = tokenizer.eos_token_id
        self.rag_eos = int(eos) if eos is not None else min(self.eos_ids)
        # stacked per-row LoRA, kept in step with the model by sync_batched_lora (the adapter
        # registry's on_change hook); None = PEFT's own path
        self.batched: BatchedLora | None = None
        # counts the registry's changes to the weights (installs, swaps, unloads, merges)
        self.weights_epoch = 0
        # counts the changes to the base weights themselves (merges, unmerges: an unmerge
        # leaves them within rounding of what they were, not equal): keys and values computed
        # before one never serve after it (prefix_cache.py)
        self.base_epoch = 0

    @property
    def kind(self) -> GeneratorKind:
        return self.family.kind

    # ---- prompts -------------------------------------------------------------------------

    def max_input_tokens(self, max_new_tokens: int) -> int:
        """Longest prompt, in tokens, that leaves room for max_new_tokens of answer."""
        return self.family.max_input_tokens(self._context_window(), max_new_tokens)

    def prompt(self, question: str, passages: Sequence[Passage], max_new_tokens: int) -> str:
        return self.prompts.build(question, passages, self.max_input_tokens(max_new_tokens))

    def concat_prompt(self, row: GenRow) -> list[int]:
        """A concat row's prompt ids: the question with as many passages as fit (after its
        conversation), the conversation alone (template "chat"), or the text as it is ("raw",
        cut to the window from the start: its end is what the answer continues)."""
        limit = self.max_input_tokens(row.max_new_tokens)
        if row.template == "raw":
            return self.family.tokenize(self.tokenizer, row.question, limit, chat=False)
        if row.template == "chat":
            return self._tokenize(self.prompts.conversation(row.question, row.history), limit)
        text = self.prompts.build(row.question, row.passages, limit, row.history)
        return self._tokenize(text, limit)

    def passage_prompts(
        self,
        question: str,
        passages: Sequence[Passage],
        reserve: int = 0,
        history: Sequence[Turn] = (),
    ) -> list[list[int]]:
        """One prompt per (question, passage) pair, the RAG modes' and their losses' inputs.
        `reserve` leaves that many tokens of the context window free (for the answer tokens a
        causal model scores after the prompt)."""
        limit = self.max_input_tokens(reserve)
        return [
            self._tokenize(self.prompts.build(question, [p], limit, history), limit)
            for p in passages
        ]

    def _tokenize(self, prompt: str, max_length: int) -> list[int]:
        return self.family.tokenize(self.tokenizer, prompt, max_length, chat=self.prompts.chat)

    def prompt_logprobs(
        self, text: str, adapter: str | None, top: int = 0
    ) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
        """Each token of text (as the tokenizer encodes it, no template) with its
        log-probability given the tokens before it (None for the first), and the `top` most
        likely tokens at its position: one teacher-forced forward pass under adapter.
        Decoder-only generators only: an encoder-decoder reads its prompt in the encoder."""
        if self.kind != "causal":
            raise InvalidInputError(
                f"prompt log-probabilities need a decoder-only generator; {self.model_id!r} "
                "is an encoder-decoder, which reads the prompt in its encoder"
            )
        ids = self.family.tokenize(
            self.tokenizer, text, self._context_window() or 10**9, chat=False
        )
        if not ids:
            raise InvalidInputError("the prompt is empty")
        tensor = torch.tensor([ids], device=self.device)
        logits = self.forward([adapter], input_ids=tensor, attention_mask=torch.ones_like(tensor))
        lp = torch.log_softmax(logits.logits[0].float(), dim=-1)  # [L, V]: position t predicts t+1
        out: list[tuple[int, float | None, list[tuple[int, float]]]] = [(ids[0], None, [])]
        for t in range(1, len(ids)):
            row = lp[t - 1]
            best = row.topk(top) if top else None
            alts = (
                []
                if best is None
                else list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
            )
            out.append((ids[t], float(row[ids[t]]), alts))
        return out

    # ---- adapters and model calls -----------------------------------------------------------

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
        return {"adapter_names": [BASE_ADAPTER if a is None else a for a in adapters]}

    def forward(self, adapters: Sequence[str | None], **inputs: Any) -> Any:
        """model(**inputs) with row i under adapters[i] (None = the base), no autograd."""
        if self.kind == "causal":
            # With left padding a row's first real token must still be position 0. generate()
            # derives positions from the mask; a plain forward counts from the padded start,
            # which learned absolute positions (GPT-2) do not forgive.
            mask = inputs.get("attention_mask")
            if mask is not None and "position_ids" not in inputs:
                inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
        with torch.inference_mode():
            return self.model(**inputs, **self.adapter_kwargs(adapters))

    # ---- decoding --------------------------------------------------------------------------

    def generate(self, rows: Sequence[GenRow]) -> list[str]:
        """Every row's answer text (greedy for concat), through the step batch."""
        self.adapter_kwargs([r.adapter for r in rows])  # refuse unknown adapters up front
        return [a.text for a in decode(self, rows)]

    def cannot_step(self) -> str | None:
        """Why concat rows must decode through transformers' generate(), or None."""
        why = self.family.cannot_step()
        if why is not None:
            return why
        try:
            processors = self.model._get_logits_processor(  # type: ignore[operator]
                self._greedy(1), input_ids_seq_length=1, device="cpu", model_kwargs={}
            )
        except Exception as exc:  # a transformers without this private helper: be safe
            return f"cannot tell the generation config's logits processors ({exc})"
        if len(processors):
            names = ", ".join(type(p).__name__ for p in processors)
            return f"the generation config adds logits processors ({names})"
        return None

    def generate_whole(self, rows: Sequence[GenRow]) -> list[Decoded]:
        """Greedy concat answers through transformers' generate(), which applies the generation
        config's logits processors. Each row's prompt is fitted to its own budget; only when a
        causal batch's longest prompt plus its longest answer would overrun the context window
        is the batch split into calls that fit."""
        ids = [self.concat_prompt(r) for r in rows]
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
        rows_ctx: AbstractContextManager[None] = nullcontext()
        if self.batched is not None and "adapter_names" in extra:
            rows_ctx = self.batched.rows(extra.pop("adapter_names"))
        with torch.inference_mode(), rows_ctx:
            output = self._hf.generate(**enc, generation_config=self._greedy(longest), **extra)
        new = self.family.generated(output, enc["input_ids"].shape[1])  # [B, T <= longest]
        # Greedy decoding is prefix-consistent: each row is cut at its own limit.
        return [self.decode_answer(new[i, : r.max_new_tokens]) for i, r in enumerate(rows)]

    def _groups(self, lengths: Sequence[int], new_tokens: Sequence[int]) -> list[list[int]]:
        """Row indices in batches whose longest prompt + longest answer fit the window:
        normally one; otherwise first-fit over rows by decreasing prompt length."""
        everyone = list(range(len(lengths)))
        window = self.family.batch_window(self._context_window())
        if window is None or max(lengths) + max(new_tokens) <= window:
            return [everyone]
        groups: list[list[int]] = []
        for i in sorted(everyone, key=lambda j: -lengths[j]):
            for group in groups:
                longest = max(new_tokens[i], *(new_tokens[j] for j in group))
                if lengths[group[0]] + longest <= window:
                    group.append(i)
                    break
            else:
                groups.append([i])
        return [sorted(g) for g in groups]

    def decode_answer(self, tokens: Sequence[int] | torch.Tensor) -> Decoded:
        """The text of generated tokens, cut at the first end-of-sequence token."""
        ids: list[int] = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        generated = len(ids)
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids, generated = ids[:i], i + 1  # what follows the end is padding
                break
        return Decoded(str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip(), generated)

    def _decode(self, tokens: torch.Tensor) -> str:
        return self.decode_answer(tokens).text

    # ---- helpers ---------------------------------------------------------------------------

    def _encode(self, prompts: Sequence[str], max_length: int) -> BatchEncoding:
        """Tokenize and pad prompts into [B, L] input_ids and attention_mask on self.device."""
        return self._pad([self._tokenize(p, max_length) for p in prompts])

    def _pad(self, ids: Sequence[list[int]]) -> BatchEncoding:
        enc = self.tokenizer.pad({"input_ids": list(ids)}, padding=True, return_tensors="pt")
        return enc.to(self.device)

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


def sync_batched_lora(generator: Generator, model: torch.nn.Module) -> None:
    """Keep generator.batched in step with the model the registry now serves (model thread).

    A PeftModel gets stacks (rebuilt after every change, since a hot swap keeps the set of
    names but not the weights); a plain model (no adapters, or one merged into the weights)
    gets none, and the patched layers are given PEFT's own forward back.
    """
    generator.weights_epoch += 1
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
