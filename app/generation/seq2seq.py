"""The encoder-decoder family (T5, FLAN-T5, BART): the prompt goes to the encoder, the answer
comes from the decoder.

In a step batch the decoder's self-attention cache is padded on the left, so that a row's
new token sits in the last column for every row. What each model needs for that to be exact,
per row, as if the row were decoded alone:
- T5 (relative position bias): nothing; a bias that depends on key - query distance does not
  see a shift of both;
- BART (learned absolute positions, counted from the cache length for the whole batch): the
  decoder's position embedding is shifted per row for the step (`_bart_positions`).
Other position schemes decode exactly only when every row starts together (no joins).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from app.contracts import GeneratorKind
from app.generation.family import Past, core, fill
from app.generation.kv import State

RELATIVE_POSITIONS = frozenset({"t5", "mt5"})  # left padding is exact as it is
SHIFTED_POSITIONS = frozenset({"bart"})  # exact with the decoder's positions shifted per row
DEFAULT_MAX_INPUT = 512  # T5's training length; relative positions leave no config limit


class Seq2Seq:
    kind: ClassVar[GeneratorKind] = "seq2seq"
    padding_side: ClassVar[Literal["left", "right"]] = "right"
    # The encoder reads the whole prompt bidirectionally: no prefix of it has keys and values
    # of its own, and an identical prompt (the same question and passage) is what repeats:
    # its encoder output is reused instead (`encode`, prefill's `states`; prefix_cache.py)
    reuses_prefixes: ClassVar[bool] = False
    reuses_inputs: ClassVar[bool] = True

    def __init__(self, model: Any) -> None:
        self.config = model.config
        self.start = decoder_start(model)
        self.pad = int(getattr(model.config, "pad_token_id", None) or 0)  # decoder padding

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "?"))

    def cannot_join(self) -> str | None:
        if self.model_type in RELATIVE_POSITIONS | SHIFTED_POSITIONS:
            return None
        return f"seq2seq model type {self.model_type!r}: per-row decoder positions not known"

    def cannot_step(self) -> str | None:
        return None

    def prefill(
        self,
        model: Any,
        ids: torch.Tensor,
        mask: torch.Tensor,
        extra: dict[str, Any],
        past: Past | None = None,
        states: torch.Tensor | None = None,
    ) -> tuple[State, torch.Tensor]:
        if past is not None:
            raise ValueError("an encoder-decoder prefill takes no cached prefix")
        n = ids.shape[0]
        inputs: dict[str, Any] = {"input_ids": ids}
        if states is not None:  # the encoder's output, given: the encoder does not run
            inputs = {"encoder_outputs": BaseModelOutput(last_hidden_state=states)}
        out = model(
            **inputs,
            attention_mask=mask,
            decoder_input_ids=ids.new_full((n, 1), self.start),
            use_cache=True,
            **extra,
        )
        state = State(
            out.past_key_values,
            torch.ones(n, 1, dtype=torch.long, device=ids.device),
            torch.zeros(0, dtype=torch.long),
            out.encoder_last_hidden_state,
            mask.long(),
        )
        return state, out.logits[:, -1]

    def stack(self, model: Any) -> torch.nn.ModuleList | None:
        return None  # an encoder's output is reused whole (reuses_inputs), never split

    def climb(
        self,
        model: Any,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        extra: dict[str, Any],
        past: Past | None,
        start: int,
    ) -> tuple[State, torch.Tensor]:
        raise TypeError("an encoder-decoder prefill does not start partway")

    def capture(self, model: Any, layer: int) -> AbstractContextManager[list[torch.Tensor]]:
        raise TypeError("an encoder-decoder prefill does not start partway")

    def encode(
        self, model: Any, ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, Any]
    ) -> torch.Tensor:
        """The encoder alone on ids [J, S] (mask [J, S]): its output [J, S, d]. PEFT's
        per-row adapter_names, when given, hook the LoRA layers as its forward() would."""
        hooks = getattr(model, "_enable_peft_forward_hooks", None)
        with hooks(**extra) if callable(hooks) and extra else nullcontext():
            out = core(model).get_encoder()(input_ids=ids, attention_mask=mask)
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def decode(self, model: Any, state: State, extra: dict[str, Any]) -> torch.Tensor:
        assert state.enc_hidden is not None
        width = state.mask.shape[1]
        shift = width - state.mask.sum(1)  # [B] left padding of each row's decoder cache
        state.mask = F.pad(state.mask, (0, 1), value=1)
        shifted = self.model_type in SHIFTED_POSITIONS
        with _bart_positions(model, shift) if shifted else nullcontext():
            out = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=state.enc_hidden),
                attention_mask=state.enc_mask,
                decoder_input_ids=state.last[:, None],
                decoder_attention_mask=state.mask,
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
        filled = fill(answers, answer_mask, self.pad)  # [P, T]
        start = filled.new_full((filled.shape[0], 1), self.start)
        decoder_input_ids = torch.cat([start, filled[:, :-1]], dim=1)  # shifted right
        inputs: dict[str, Any] = {"attention_mask": prompt_mask}
        if encoder_states is None:
            inputs["input_ids"] = prompt_ids
        else:
            inputs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_states)
        out = model(decoder_input_ids=decoder_input_ids, use_cache=False, **inputs, **extra)
        logits: torch.Tensor = out.logits
        return logits

    def max_input_tokens(self, window: int | None, max_new_tokens: int) -> int:
        # the answer lives in the decoder, so it takes no room from the encoder input
        return window or DEFAULT_MAX_INPUT

    def batch_window(self, window: int | None) -> int | None:
        return None

    def tokenize(
        self, tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int, *, chat: bool
    ) -> list[int]:
        ids: list[int] = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
        return ids

    def generated(self, output: torch.Tensor, prompt_width: int) -> torch.Tensor:
        return output[:, 1:]  # drop decoder_start_token_id


def decoder_start(model: Any) -> int:
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        start = model.config.decoder_start_token_id
    return int(start)


@contextmanager
def _bart_positions(model: Any, shift: torch.Tensor) -> Iterator[None]:
    """BART's decoder position embedding for one step, with row i's positions moved back by
    shift[i] (its left padding): BartDecoder numbers the new token by the cache length, which
    is the batch's, not the row's."""
    emb = model.get_decoder().embed_positions
    offset = emb.offset

    def forward(
        input_ids: torch.Tensor,
        past_key_values_length: int = 0,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            seq = input_ids.shape[1]
            position_ids = torch.arange(
                past_key_values_length, past_key_values_length + seq, device=emb.weight.device
            )
        rows = position_ids.view(1, -1) - shift.view(-1, 1).to(position_ids.device)  # [B, seq]
        out: torch.Tensor = torch.nn.Embedding.forward(emb, rows + offset)
        return out

    emb.forward = forward
    try:
        yield
    finally:
        del emb.forward
