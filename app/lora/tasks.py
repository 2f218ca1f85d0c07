"""The bundle side of loaded adapters: each name's manifest (its request defaults) and its
question-encoder adapter, beside the generator adapter that the AdapterRegistry holds.

RagService drives it: `prepare` validates off every model thread, then `apply` and `remove` run
on the service's single retrieval thread, the thread that also encodes questions, so a question
adapter is never added or deleted in the middle of an encode. A plain adapter folder (no
manifest) clears whatever bundle parts an earlier load under the same name left.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.lora.bundle import PreparedTask, TaskManifest, prepare_task
from app.lora.question_adapters import QuestionAdapterInfo, QuestionAdapters
from app.retrieval.encoders import TextEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskView:
    """What GET /adapters shows of a bundle."""

    manifest: TaskManifest
    question: QuestionAdapterInfo | None


class TaskBundles:
    def __init__(self, root: Path, questions: QuestionAdapters | None) -> None:
        """questions: the server's question adapters (None: no encoder to adapt, so bundles
        with a question part are refused)."""
        self.root = root
        self.questions = questions
        self._manifests: dict[str, TaskManifest] = {}
        self._lock = threading.Lock()  # the map is read from the event loop and the API

    @classmethod
    def for_encoder(cls, root: Path, encoder: TextEncoder) -> TaskBundles:
        """Bundles whose question adapters adapt `encoder` (the server's)."""
        return cls(root, QuestionAdapters(encoder))

    # ---- any thread ---------------------------------------------------------------------

    def prepare(self, rel: str) -> PreparedTask:
        """Read and validate root/rel's manifest and question part (no model is touched)."""
        q = self.questions
        return prepare_task(
            self.root,
            rel,
            encoder_fingerprint=q.fingerprint if q is not None else None,
            question_layout=q.layout if q is not None else None,
        )

    def manifest(self, name: str | None) -> TaskManifest | None:
        if name is None:
            return None
        with self._lock:
            return self._manifests.get(name)

    def view(self, name: str) -> TaskView | None:
        manifest = self.manifest(name)
        if manifest is None:
            return None
        info = self.questions.info(name) if self.questions is not None else None
        return TaskView(manifest, info)

    # ---- the retrieval thread -----------------------------------------------------------

    def apply(self, name: str, task: PreparedTask) -> None:
        """Make name's bundle parts task's: install its question adapter or drop an old one."""
        if self.questions is not None:
            if task.question is not None:
                self.questions.install(name, task.question)
            else:
                self.questions.discard(name)
        with self._lock:
            if task.manifest is None:
                self._manifests.pop(name, None)
            else:
                self._manifests[name] = task.manifest

    def remove(self, name: str) -> None:
        if self.questions is not None:
            self.questions.discard(name)
        with self._lock:
            self._manifests.pop(name, None)

    def question_vectors(self, questions: list[str], name: str | None) -> np.ndarray | None:
        """[n, dim] vectors from name's question adapter; None when it has none (the server's
        encoder then encodes as usual)."""
        if name is None or self.questions is None or name not in self.questions:
            return None
        return self.questions.encode(questions, name)
