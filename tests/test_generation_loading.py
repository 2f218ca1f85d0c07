"""load_generator and the default model's one-time GGUF conversion."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.contracts import GenRow, Passage
from app.errors import InvalidInputError
from app.generation import loading
from app.generation.loading import default_gguf, load_generator, prepare_default_generator

FRANCE = Passage(
    "fr#0",
    "fr",
    "France",
    "France is a country in Western Europe. Its capital and largest city is Paris.",
)


def test_crashed_conversion_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half written, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(loading, "_convert_gguf", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_default_generator(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp folder


def test_converted_folder_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = tmp_path / default_gguf().stem
    done.mkdir()
    (done / "config.json").write_text("{}")

    def must_not_run(gguf: Path, out: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(loading, "_convert_gguf", must_not_run)
    assert prepare_default_generator(tmp_path) == done


def test_bad_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="'float8'"):
        load_generator("default", dtype="float8", cache_dir=tmp_path)


@pytest.mark.slow
def test_default_generator_converts_once_and_answers(tmp_path: Path) -> None:
    folder = prepare_default_generator(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temp left over
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    gen = load_generator("default", cache_dir=tmp_path)
    load_s = time.perf_counter() - started
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert load_s < 15, load_s
    assert gen.kind == "causal" and gen.prompts.chat
    assert gen.model_id == loading.DEFAULT_MODEL_ID
    question = "What is the capital of France?"
    with_passage, closed_book = gen.generate(
        [GenRow(question, [FRANCE], None, 24), GenRow(question, [], None, 24)]
    )
    assert "Paris" in with_passage
    assert "Paris" in closed_book


def test_missing_generator_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"cannot load generator '.*no-such-model'"):
        load_generator(str(tmp_path / "no-such-model"), cache_dir=tmp_path)
