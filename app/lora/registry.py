"""The adapters installed in the generator, by public name.

Each public name maps to an internal PEFT adapter name ("lorag1", "lorag2", ...) that is never
reused. Replacing a name installs the new adapter under a fresh internal name, swaps the
mapping, then deletes the old one: until the swap the old adapter serves, and if any step of
the install fails it goes on serving. Rows name internal adapters (GenRow.adapter), so the
engine must look them up with peft_name() when it forms a batch, on the model thread.

The base model is wrapped into a PeftModel on the first install and unwrapped (PEFT's unload,
which puts the original layers back) when the last adapter goes, so a registry with nothing
installed serves the plain base model at full speed.

Threads: prepare/get/list/peft_name may run anywhere; install and unload mutate the model and
must run on the thread that runs generation (the engine serializes them with batches). A lock
guards only the name map, so readers on other threads never see it half-updated.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, PeftModelForCausalLM, PeftModelForSeq2SeqLM
from peft.utils import set_peft_model_state_dict

from app.errors import AdapterInvalid, AdapterNotFound, InvalidInputError
from app.generation.backends import Generator
from app.lora.paths import resolve_under
from app.lora.validate import TASK_TYPES, BaseLayout, ValidatedAdapter, describe, validate_adapter

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PEFT_CLASSES = {"seq2seq": PeftModelForSeq2SeqLM, "causal": PeftModelForCausalLM}

PreparedAdapter = ValidatedAdapter  # what prepare() hands to install()


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str  # as given, relative to the adapters root
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str | None  # base_model_name_or_path from the adapter's config
    bytes: int
    loaded_at: datetime
    version: str  # sha256 of adapter_model.safetensors, first 12 hex digits


@dataclass(frozen=True)
class _Entry:
    info: AdapterInfo
    internal: str


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInputError(
            f"adapter name {name!r} is invalid: use 1-64 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )


class AdapterRegistry:
    def __init__(
        self,
        generator: Generator,
        root: Path,
        *,
        on_change: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        """on_change(model) runs on the model thread after each install/unload, with the model
        now serving (a PeftModel, or the plain base after the last unload): the hook for
        anything that caches per-adapter state, such as stacked LoRA weights."""
        if isinstance(generator.model, PeftModel):
            raise ValueError("the generator already holds a PeftModel; give the plain base model")
        self.generator = generator
        self.root = root
        self._layout = BaseLayout.of(generator.model, generator.kind, generator.model_id)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._on_change = on_change

    # ---- any thread ---------------------------------------------------------------------

    def prepare(self, rel_path: str) -> PreparedAdapter:
        """Read and validate the adapter at root/rel_path; touches no model state."""
        folder = resolve_under(self.root, rel_path)
        return validate_adapter(folder, self.root, self._layout, rel=rel_path)

    def get(self, name: str) -> AdapterInfo:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(name)
        return entry.info

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._entries[n].info for n in sorted(self._entries)]

    def peft_name(self, name: str) -> str:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(name)
        return entry.internal

    # ---- model thread -------------------------------------------------------------------

    def install(self, name: str, prepared: PreparedAdapter) -> tuple[AdapterInfo, bool]:
        """Install prepared as name; returns (info, whether it replaced an adapter)."""
        check_name(name)
        internal = f"lorag{next(self._ids)}"
        self._inject(internal, prepared)
        info = AdapterInfo(
            name=name,
            path=prepared.rel,
            bytes=prepared.bytes,
            loaded_at=datetime.now(UTC),
            version=prepared.version,
            **describe(prepared.config),
        )
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = _Entry(info, internal)
        if old is not None:
            self._delete(old.internal)
        self._changed()
        log.info(
            "%s adapter %r (%s, r=%d, version %s) as %s",
            "replaced" if old else "installed",
            name,
            info.path,
            info.rank,
            info.version,
            internal,
        )
        return info, old is not None

    def unload(self, name: str) -> None:
        """Remove the adapter and free its weights; the base serves alone after the last."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFound(name)
        self._delete(entry.internal)
        with self._lock:
            del self._entries[name]
        self._changed()
        log.info("unloaded adapter %r (%s)", name, entry.internal)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.generator.model)

    def _inject(self, internal: str, prepared: PreparedAdapter) -> None:
        """Add prepared's weights under internal; on failure the model is as it was."""
        config = copy.deepcopy(prepared.config)
        config.task_type = TASK_TYPES[self.generator.kind]
        model = self.generator.model
        wrapped_here = not isinstance(model, PeftModel)
        try:
            if isinstance(model, PeftModel):
                model.add_adapter(internal, config)
            else:
                # wraps in place: the base's target layers become LoRA layers
                model = PEFT_CLASSES[self.generator.kind](model, config, adapter_name=internal)
            result: Any = set_peft_model_state_dict(
                model, prepared.state_dict, adapter_name=internal
            )
            missing = [k for k in result.missing_keys if "lora_" in k and f".{internal}." in k]
            if missing or result.unexpected_keys:
                raise AdapterInvalid(
                    f"adapter {prepared.rel!r} did not fit the model: missing "
                    f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}"
                )
        except Exception:
            if isinstance(model, PeftModel):
                if wrapped_here:
                    _tuner(model).unload()  # puts the original layers back
                elif internal in model.peft_config:
                    model.delete_adapter(internal)
            raise
        self.generator.model = model.eval()

    def _delete(self, internal: str) -> None:
        model = self.generator.model
        assert isinstance(model, PeftModel), "an adapter is installed, so the model is wrapped"
        model.delete_adapter(internal)
        if not model.peft_config:
            self.generator.model = _tuner(model).unload().eval()
        else:
            model.eval()


def _tuner(model: PeftModel) -> Any:
    """The LoraModel inside a PeftModel (typed as a Module by PEFT)."""
    return model.base_model
