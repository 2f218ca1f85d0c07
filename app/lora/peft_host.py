"""The PEFT surgery on an AdapterHost's model: add and delete adapters, merge and unmerge one.

PeftHost owns the host's `model` (see app.contracts.AdapterHost): it wraps the plain base into a
PeftModel on the first inject and unwraps it (PEFT's unload, which puts the original layers
back) when the last adapter is deleted, so a host with nothing installed serves the plain base
at full speed. While one adapter is merged into the base weights the host serves the plain
transformers model (its LoRA layers merged, running base_layer), and the PeftModel waits here
until unmerge.

It knows adapters only by internal PEFT name; which public name maps to which, leases and
residency are the registry's (app/lora/registry.py), which also says when the model changed.
Every method mutates the model, so call them on the thread that runs generation.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from peft import PeftModel, PeftModelForCausalLM, PeftModelForSeq2SeqLM
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import set_peft_model_state_dict
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from app.contracts import AdapterHost
from app.errors import AdapterInvalid
from app.lora.validate import TASK_TYPES, ValidatedAdapter

log = logging.getLogger(__name__)

PEFT_CLASSES = {"seq2seq": PeftModelForSeq2SeqLM, "causal": PeftModelForCausalLM}


class PeftHost:
    """The PEFT state of `host.model`: which adapters it carries, and which one is merged."""

    def __init__(self, host: AdapterHost) -> None:
        if isinstance(host.model, PeftModel):
            raise ValueError("the generator already holds a PeftModel; give the plain base model")
        self.host = host  # its .model is ours to swap from now on (AdapterHost)
        self.element_size = next(host.model.parameters()).element_size()  # the model's dtype
        self._peft: PeftModel | None = None  # the wrapped model while merged
        self._merged: str | None = None  # internal name merged into the base weights

    @property
    def model(self) -> nn.Module:
        """What the host serves now: the base, a PeftModel, or the merged base."""
        return self.host.model

    @property
    def merged(self) -> str | None:
        """The internal name merged into the base weights, if any."""
        return self._merged

    def inject(self, internal: str, prepared: ValidatedAdapter) -> None:
        """Add prepared's weights under internal; on failure the model is as it was.
        Not while merged (unmerge first)."""
        assert self._merged is None, f"{self._merged} is merged; unmerge it first"
        config = copy.deepcopy(prepared.config)
        config.task_type = TASK_TYPES[self.host.kind]
        model = self.host.model
        wrapped_here = not isinstance(model, PeftModel)
        try:
            if isinstance(model, PeftModel):
                model.add_adapter(internal, config)
            else:
                # wraps in place: the base's target layers become LoRA layers
                model = PEFT_CLASSES[self.host.kind](model, config, adapter_name=internal)
            load_lora_weights(model, prepared, internal, f"adapter {prepared.rel!r}", "the model")
        except Exception:
            if isinstance(model, PeftModel):
                if wrapped_here:
                    _tuner(model).unload()  # puts the original layers back
                elif internal in model.peft_config:
                    model.delete_adapter(internal)
            raise
        self.host.model = model.eval()

    def delete(self, internal: str) -> None:
        """Free internal's weights; the plain base serves again after the last. Not while
        merged (unmerge first)."""
        model = self.host.model
        assert isinstance(model, PeftModel), "an adapter is installed, so the model is wrapped"
        model.delete_adapter(internal)
        if not model.peft_config:
            self.host.model = _tuner(model).unload().eval()
        else:
            model.eval()

    def merge(self, internal: str) -> None:
        """Merge internal into the base weights and serve the plain model. Nothing may be
        merged already (unmerge first, so the caller sees that change too)."""
        assert self._merged is None, f"{self._merged} is merged; unmerge it first"
        model = self.host.model
        assert isinstance(model, PeftModel), "an adapter is installed, so the model is wrapped"
        _tuner(model).merge_adapter([internal])
        self._peft, self._merged = model, internal
        # the plain model: its LoRA layers run base_layer (merged weights) when given no
        # adapter_names, which is what the generator passes to a non-PEFT model
        self.host.model = model.get_base_model()
        self.host.base_epoch += 1
        log.info("merged adapter %s into the base weights", internal)

    def unmerge(self) -> bool:
        """Put the merged adapter's weights back out and serve the PeftModel again; False
        (nothing done) when none is merged."""
        if self._merged is None:
            return False
        assert self._peft is not None
        _tuner(self._peft).unmerge_adapter()
        self.host.model = self._peft.eval()
        self.host.base_epoch += 1
        log.info("unmerged adapter %s", self._merged)
        self._peft, self._merged = None, None
        return True


def untouched_layers(model: nn.Module, stack: nn.ModuleList) -> int:
    """How many leading layers of a model's decoder stack no installed adapter changes: the
    index of the first layer holding a PEFT layer with an adapter in it (merged or not), 0 when
    one sits outside the stack (embeddings, a module to save), the output head aside, which no
    layer's keys or values read; len(stack) when there is none."""
    where = {id(m): i for i, layer in enumerate(stack) for m in layer.modules()}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    first = len(stack)
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            return 0
        if not isinstance(module, BaseTunerLayer) or module is head:
            continue
        if not any(len(getattr(module, n, ())) for n in module.adapter_layer_names):
            continue  # every adapter deleted from it
        at = where.get(id(module))
        if at is None:
            return 0
        first = min(first, at)
    return first


def load_lora_weights(
    model: PeftModel, prepared: ValidatedAdapter, internal: str, what: str, into: str
) -> None:
    """Copy prepared's LoRA weights into the adapter slot `internal` that `model` already has;
    AdapterInvalid ("<what> did not fit <into>: ...") when a key is missing or unexpected."""
    result: Any = set_peft_model_state_dict(model, prepared.state_dict, adapter_name=internal)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{internal}." in k]
    if missing or result.unexpected_keys:
        raise AdapterInvalid(
            f"{what} did not fit {into}: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )


def _tuner(model: PeftModel) -> Any:
    """The LoraModel inside a PeftModel (typed as a Module by PEFT)."""
    return model.base_model
