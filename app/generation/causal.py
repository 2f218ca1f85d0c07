"""The decoder-only family (llama, SmolLM2, GPT-2): the answer continues the prompt.

Prompts are padded on the left, so every row's next token sits in the last column; each row is
given its own positions (`position_ids`, the count of its real tokens), as generate() derives
them from the mask, so a left-padded row decodes as it would alone, rotary (relative) and
learned absolute positions (GPT-2) alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from app.contracts import GeneratorKind
from app.generation.family import Past, core, fill
from app.generation.kv import State

DEFAULT_CONTEXT = 2048


class Causal:
    kind: ClassVar[GeneratorKind] = "causal"
    padding_side: ClassVar[Literal["left", "right"]] = "left"
    reuses_prefixes: ClassVar[bool] = True
    reuses_inputs: ClassVar[bool] = False  # no encoder

    def __init__(self, model: Any) -> None:
        params = inspect.signature(core(model).forward).parameters
        self._positions = "position_ids" in params
        self._keep_logits = "logits_to_keep" in params
        self._config = model.config
        self._layers = sorted(
            {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
        )

    def cannot_join(self) -> str | None:
        if self._layers != ["DynamicLayer"]:
            return f"cache layers {self._layers} (sliding windows) cannot be padded per row"
        return self.cannot_step()

    def cannot_step(self) -> str | None:
        return None if self._positions else "the model's forward takes no position_ids"

    def prefill(
        self,
        model: Any,
        ids: torch.Tensor | None,
        mask: torch.Tensor,
        extra: dict[str, Any],
        past: Past | None = None,
        states: torch.Tensor | None = None,
    ) -> tuple[State, torch.Tensor]:
        if states is not None:
            raise ValueError("a decoder-only prefill takes no encoder output")
        if self._keep_logits:
            extra = {**extra, "logits_to_keep": 1}
        if past is not None:
            # the cached prefix first (left padded), then what follows it (left padded): the
            # mask has a hole between the two for rows with the shorter prefix or suffix, and
            # each token's position counts only the real tokens before it
            layers, past_mask = past
            cache = DynamicCache(ddp_cache_data=layers, config=self._config)
            extra = {**extra, "past_key_values": cache}
            mask = torch.cat([past_mask.to(mask.dtype), mask], dim=1)  # [J, P + L]
            position_ids = positions(mask)[:, past_mask.shape[1] :]
        else:
            position_ids = positions(mask)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **extra,
        )
        return State(out.past_key_values, mask.long(), mask.new_zeros(0)), out.logits[:, -1]

    def encode(
        self, model: Any, ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, Any]
    ) -> torch.Tensor:
        raise TypeError("a decoder-only model has no encoder")

    def stack(self, model: Any) -> nn.ModuleList | None:
        found = _stack(model, self._config)
        return found[2] if found is not None else None

    def climb(
        self,
        model: Any,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        extra: dict[str, Any],
        past: Past | None,
        start: int,
    ) -> tuple[State, torch.Tensor]:
        # The model's own forward over its layers from `start` on, given what enters that
        # layer as inputs_embeds: its masks and positions are built as for any prefill, and each
        # attention layer writes its own index of the cache. Whether a model's forward hands
        # inputs_embeds to its first layer untouched (GPT-2 adds positions, Gemma scales) is
        # what StepBatch._split checks before it splits anything.
        found = _stack(model, self._config)
        if found is None:
            raise TypeError("this model's decoder layers were not found")
        owner, name, layers = found
        setattr(owner, name, nn.ModuleList(list(layers)[start:]))
        try:
            return self.prefill(model, None, mask, {**extra, "inputs_embeds": hidden}, past)
        finally:
            setattr(owner, name, layers)

    @contextmanager
    def capture(self, model: Any, layer: int) -> Iterator[list[torch.Tensor]]:
        layers = self.stack(model)
        if layers is None:
            raise TypeError("this model's decoder layers were not found")
        got: list[torch.Tensor] = []

        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            got.append(args[0] if args else kwargs["hidden_states"])

        handle = layers[layer].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield got
        finally:
            handle.remove()

    def decode(self, model: Any, state: State, extra: dict[str, Any]) -> torch.Tensor:
        at = state.mask.sum(1, keepdim=True)  # [B, 1] the row's real tokens so far
        state.mask = F.pad(state.mask, (0, 1), value=1)
        out = model(
            input_ids=state.last[:, None],
            attention_mask=state.mask,
            position_ids=at,
            past_key_values=state.cache,
            use_cache=True,
            **extra,
        )
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    def answer_logits(
        self,
        model: Any,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        answers: torch.Tensor,
        answer_mask: torch.Tensor,
        extra: dict[str, Any],
        encoder_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # One pass over prompt + answer: a step batch's prefill cache has been extended by
        # decoding by the time a RAG-Sequence request is scored, and copying it per candidate
        # would cost as much memory as recomputing.
        width = answers.shape[1]
        prompt_ids, prompt_mask = left_pad(prompt_ids, prompt_mask)  # the answer follows
        # a masked answer position is masked in attention too: its token is never read
        input_ids = torch.cat([prompt_ids, fill(answers, answer_mask, 0)], 1)
        mask = torch.cat([prompt_mask, answer_mask.to(prompt_mask.dtype)], dim=1)  # [P, L+T]
        if self._keep_logits:
            extra = {**extra, "logits_to_keep": width + 1}
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions(mask),
            use_cache=False,
            **extra,
        )
        logits: torch.Tensor = out.logits[:, -(width + 1) : -1]  # L-1+t predicts token t
        return logits

    def max_input_tokens(self, window: int | None, max_new_tokens: int) -> int:
        window = window or DEFAULT_CONTEXT
        return max(window - max_new_tokens, window // 4)

    def batch_window(self, window: int | None) -> int | None:
        return window or DEFAULT_CONTEXT

    def tokenize(
        self, tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int, *, chat: bool
    ) -> list[int]:
        # A chat template writes its own special tokens. Plain text gets the tokenizer's (a BOS
        # for llama-style tokenizers), but not a trailing EOS: a prompt that ends the sequence
        # would make the model continue after an end. (T5-style tokenizers append one.)
        ids: list[int] = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        if ids and not chat and ids[-1] == tokenizer.eos_token_id:
            ids = ids[:-1]
        return ids[-max_length:]  # the budget already fits; if not, keep the prompt's end

    def generated(self, output: torch.Tensor, prompt_width: int) -> torch.Tensor:
        return output[:, prompt_width:]


def _stack(model: Any, config: Any) -> tuple[nn.Module, str, nn.ModuleList] | None:
    """The module holding the decoder layers, its attribute's name, and the layers (the one
    ModuleList as long as the config's layer count: llama's model.layers, GPT-2's
    transformer.h)."""
    count = getattr(config, "num_hidden_layers", None)
    inner = core(model)
    for name, module in inner.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name:
            owner, _, attr = name.rpartition(".")
            return inner.get_submodule(owner), attr, module
    return None


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as transformers' generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the left (a shared cache appends every row at one column)."""
    order = torch.argsort(attention_mask.ne(0).to(torch.int8), dim=1, stable=True)  # pads first
    return input_ids.gather(1, order), attention_mask.gather(1, order)
