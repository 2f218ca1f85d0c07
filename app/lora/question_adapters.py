"""Question-encoder LoRA for serving: per-request question adapters around a copy of the
server encoder's question tower (app/retrieval/question_tower.py says why a copy).

QuestionAdapters keeps every loaded question adapter in one PeftModel around that copy and picks
the adapter per forward call with PEFT's `adapter_names` (no shared `set_adapter`), so two
requests with different adapters cannot see each other's. Installs and deletes mutate the copy;
RagService runs them, like every encode, on its single retrieval thread, which serializes them
with the forwards (see RagService._retrieval).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from app.errors import AdapterNotFound
from app.lora.peft_host import load_lora_weights
from app.lora.validate import BaseLayout, ValidatedAdapter, describe
from app.retrieval.encoders import TextEncoder
from app.retrieval.question_tower import QuestionTower, tower_of

log = logging.getLogger(__name__)


def question_layout(tower: QuestionTower) -> BaseLayout:
    """What validate_adapter checks a question adapter's files against.

    The kind is only used to check a task_type; question adapters are saved with none
    (a bare PeftModel around the transformer), so the check does not apply."""
    return BaseLayout.of(tower.transformer, "causal", tower.fingerprint)


@dataclass(frozen=True)
class QuestionAdapterInfo:
    name: str
    path: str  # relative to the adapters root
    version: str  # sha256 of its adapter_model.safetensors, first 12 hex digits
    rank: int
    target_modules: list[str]
    bytes: int


class QuestionAdapters:
    """Loaded question-encoder adapters by public name; encode questions through one of them.

    Call install/discard/encode from one thread (RagService's retrieval thread); name lookups
    (`in`, info, names) may run anywhere."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self._tower: QuestionTower | None = None  # built on first use: it inspects the model
        self._peft: PeftModel | None = None  # the copy, wrapped once an adapter is installed
        self._entries: dict[str, tuple[str, QuestionAdapterInfo]] = {}  # name -> internal, info
        self._lock = threading.Lock()  # guards _entries for readers on other threads
        self._ids = 0

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    @property
    def tower(self) -> QuestionTower:
        if self._tower is None:
            self._tower = tower_of(self.encoder)
        return self._tower

    def layout(self) -> BaseLayout:
        return question_layout(self.tower)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def info(self, name: str) -> QuestionAdapterInfo | None:
        with self._lock:
            entry = self._entries.get(name)
        return entry[1] if entry is not None else None

    def install(self, name: str, prepared: ValidatedAdapter) -> QuestionAdapterInfo:
        """Add prepared as name (replacing name's previous one); on failure nothing changes."""
        self._ids += 1
        internal = f"q{self._ids}"
        config = copy.deepcopy(prepared.config)
        config.task_type = None
        created = self._peft is None
        model: PeftModel = (
            PeftModel(self.tower.copy_transformer(), config, adapter_name=internal)
            if self._peft is None
            else self._peft
        )
        try:
            if not created:
                model.add_adapter(internal, config)
            load_lora_weights(
                model,
                prepared,
                internal,
                f"question-encoder adapter {prepared.rel!r}",
                f"the encoder {self.fingerprint!r}",
            )
        except Exception:
            if not created:
                model.delete_adapter(internal)
            raise
        self._peft = model.eval()
        desc = describe(prepared.config)
        info = QuestionAdapterInfo(
            name, prepared.rel, prepared.version, desc["rank"], desc["target_modules"],
            prepared.bytes,
        )  # fmt: skip
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = (internal, info)
        if old is not None:
            self._peft.delete_adapter(old[0])
        log.info("question-encoder adapter %r (%s) installed as %s", name, prepared.rel, internal)
        return info

    def discard(self, name: str) -> bool:
        """Remove name's question adapter if it has one; the copy goes with the last."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            return False
        assert self._peft is not None
        if len(self._peft.peft_config) == 1:
            self._peft = None  # frees the copy of the transformer
        else:
            self._peft.delete_adapter(entry[0])
        log.info("question-encoder adapter %r removed", name)
        return True

    def encode(self, questions: Sequence[str], name: str) -> np.ndarray:
        """[n, dim] float32 question vectors through name's adapter."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None or self._peft is None:
            raise AdapterNotFound(name)
        # adapter_names picks the adapter for this call only; nothing global is switched
        with torch.inference_mode():
            vectors = self.tower.encode(
                questions, self._peft, adapter_names=[entry[0]] * len(questions)
            )
        return np.ascontiguousarray(vectors.float().cpu().numpy(), dtype=np.float32)
