"""A task bundle: a generator adapter, an optional question-encoder adapter and the defaults they
were trained for, in one folder under the adapters root.

    adapters/NAME/adapter_config.json, adapter_model.safetensors   the generator's PEFT adapter
    adapters/NAME/question_encoder/                                 PEFT adapter of the question
                                                                    encoder's transformer (optional)
    adapters/NAME/lorag_task.json                                   this manifest

The generator adapter stays at the top of the folder, so every tool that reads a plain PEFT
folder (PeftModel.from_pretrained, lorag before bundles) still reads it; the question part is a
plain PEFT folder too (`PeftModel.from_pretrained(encoder_transformer, NAME/question_encoder)`).
A folder without lorag_task.json is a plain adapter and loads exactly as before.

A question adapter moves question vectors relative to passage vectors that an index holds, so it
only means something next to the encoder that built that index: the manifest records the
encoder's fingerprint and loading refuses a bundle made for another one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from app import __version__
from app.contracts import Mode
from app.errors import AdapterInvalid, AdapterPathNotFound
from app.lora.paths import resolve_under
from app.lora.validate import BaseLayout, ValidatedAdapter, validate_adapter

log = logging.getLogger(__name__)

MANIFEST_NAME = "lorag_task.json"
QUESTION_DIR = "question_encoder"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 16
MODES = ("concat", "token", "sequence")
ModeName = Mode


@dataclass(frozen=True)
class TaskManifest:
    generator_adapter: str = "."  # relative to the bundle folder
    question_encoder: str | None = None  # relative to the bundle folder; None: no question part
    mode: ModeName | None = None  # the request default when /ask does not give one
    top_k: int | None = None
    generator: dict[str, str | None] = field(default_factory=dict)  # model_id, fingerprint
    encoder: str | None = None  # the encoder fingerprint the question adapter was trained on
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    lorag_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object, rel: str) -> TaskManifest:
        where = f"{MANIFEST_NAME} of adapter {rel!r}"
        if not isinstance(raw, dict):
            raise AdapterInvalid(f"{where} is not a JSON object")
        if raw.get("format_version") != FORMAT_VERSION:
            raise AdapterInvalid(
                f"{where} has format_version {raw.get('format_version')!r}; "
                f"this lorag reads {FORMAT_VERSION}"
            )
        known = set(cls.__dataclass_fields__)
        if unknown := sorted(set(raw) - known):
            raise AdapterInvalid(f"{where} has unknown keys {unknown}")
        m = cls(**raw)
        for key in ("generator_adapter", "question_encoder", "encoder"):
            value = getattr(m, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise AdapterInvalid(f"{where}: {key} must be a non-empty string, got {value!r}")
        for key in ("generator_adapter", "question_encoder"):
            value = getattr(m, key)
            if value is not None and (PurePosixPath(value).is_absolute() or ".." in value):
                raise AdapterInvalid(
                    f"{where}: {key} {value!r} must be a path inside the bundle folder "
                    "(relative, no '..')"
                )
        if m.mode is not None and m.mode not in MODES:
            raise AdapterInvalid(f"{where}: mode {m.mode!r} is not one of {MODES}")
        top_k = m.top_k
        if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= 50):
            raise AdapterInvalid(f"{where}: top_k must be an integer in [1, 50], got {top_k!r}")
        if m.question_encoder is not None and m.encoder is None:
            raise AdapterInvalid(
                f"{where} names a question encoder but not the encoder fingerprint it was "
                "trained on ('encoder')"
            )
        if not isinstance(m.generator, dict):
            raise AdapterInvalid(f"{where}: generator must be an object")
        return m


def write_manifest(folder: Path, manifest: TaskManifest) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path, rel: str) -> TaskManifest | None:
    """The manifest in folder (resolved under the root), or None for a plain adapter folder."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
        raise AdapterInvalid(f"{MANIFEST_NAME} of adapter {rel!r} is not a small regular file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterInvalid(f"{MANIFEST_NAME} of adapter {rel!r} is not valid JSON: {e}") from e
    try:
        return TaskManifest.from_json(raw, rel)
    except TypeError as e:  # a field of the wrong shape
        raise AdapterInvalid(f"{MANIFEST_NAME} of adapter {rel!r}: {e}") from e


@dataclass(frozen=True)
class PreparedTask:
    """What a bundle adds to the generator adapter: its manifest and validated question part."""

    rel: str
    manifest: TaskManifest | None  # None: a plain adapter folder
    question: ValidatedAdapter | None


def prepare_task(
    root: Path,
    rel: str,
    *,
    encoder_fingerprint: str | None,
    question_layout: BaseLayout | Callable[[], BaseLayout] | None,
) -> PreparedTask:
    """Read and validate the bundle parts of root/rel (the generator part is the registry's).

    Refuses, naming both, a question adapter trained on an encoder other than the server's;
    its files are checked like any adapter's (safetensors only, inside the adapters root,
    shapes that fit the encoder's transformer)."""
    folder = resolve_under(root, rel)
    manifest = read_manifest(folder, rel)
    if manifest is None:
        return PreparedTask(rel, None, None)
    if manifest.generator_adapter != ".":
        raise AdapterInvalid(
            f"{MANIFEST_NAME} of adapter {rel!r}: generator_adapter must be '.' (the generator "
            f"adapter lies at the top of the bundle), got {manifest.generator_adapter!r}"
        )
    if manifest.question_encoder is None:
        return PreparedTask(rel, manifest, None)
    if manifest.encoder != encoder_fingerprint:
        raise AdapterInvalid(
            f"adapter {rel!r} has a question-encoder adapter trained on encoder "
            f"{manifest.encoder!r}, but this server's encoder is {encoder_fingerprint!r}"
        )
    assert question_layout is not None  # an encoder is configured, so is its layout
    layout = question_layout() if callable(question_layout) else question_layout
    q_rel = f"{rel.rstrip('/')}/{manifest.question_encoder}"
    try:
        q_folder = resolve_under(root, q_rel)  # refuses links out of the root
    except AdapterPathNotFound:
        raise AdapterInvalid(
            f"{MANIFEST_NAME} of adapter {rel!r} names question_encoder "
            f"{manifest.question_encoder!r}, which is not in the bundle"
        ) from None
    if folder not in q_folder.parents:
        raise AdapterInvalid(
            f"question_encoder {manifest.question_encoder!r} of adapter {rel!r} is not a "
            "folder inside the bundle"
        )
    question = validate_adapter(q_folder, root, layout, rel=q_rel)
    return PreparedTask(rel, manifest, question)
