"""Two threads loading models at once must not leave transformers' loading patches behind."""

from __future__ import annotations

import threading
from pathlib import Path

from transformers import PreTrainedModel

from app.generation.loading import load_generator
from app.retrieval.encoders import load_encoder


def test_models_loaded_in_two_threads_at_once_load_whole(
    tiny_generators: dict[str, Path], tmp_path: Path
) -> None:
    tie = PreTrainedModel.tie_weights
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def loads(n: int) -> None:
        start.wait()
        try:
            for _ in range(n):
                load_generator(str(tiny_generators["t5"]), cache_dir=tmp_path)
                load_encoder("default", "sentence-transformers")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loads, args=(4,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert PreTrainedModel.tie_weights is tie
    model = load_generator(str(tiny_generators["t5"]), cache_dir=tmp_path).model
    assert model.lm_head.weight is model.get_input_embeddings().weight
