"""End to end: `lorag serve` in a real uvicorn process on a free port, spoken to over TCP."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.serving import serve
from tests.tiny import save_lora_adapter


@pytest.mark.slow
def test_real_models_answer_cite_and_take_adapters(index_root: Path, tmp_path: Path):
    """The embedded default generator (SmolLM2-135M-Instruct) behind a real uvicorn."""
    from app.generation.loading import prepare_default_generator
    from app.settings import Settings

    model_dir = prepare_default_generator(Settings().cache_dir)
    adapters = tmp_path / "adapters"
    save_lora_adapter(model_dir, adapters / "demo", seed=3, r=4)
    env = {
        "LORAG_INDEX_DIR": str(index_root),
        "LORAG_INDEX_NAME": "facts",
        "LORAG_ADAPTERS_DIR": str(adapters),
        "LORAG_MAX_NEW_TOKENS": "24",
    }
    with serve(env) as (url, _):
        q = {"question": "Where was the tidal clock built?", "top_k": 2}
        base = httpx.post(f"{url}/ask", json=q, timeout=120).json()
        assert base["passages"][0]["doc_id"] == "oskar"
        assert "Kalmar" in base["answer"], base["answer"]  # the real model reads the passage

        put = httpx.put(f"{url}/adapters/demo", json={"path": "demo"}, timeout=60)
        assert put.status_code == 201, put.text
        adapted = httpx.post(f"{url}/ask", json={**q, "adapter": "demo"}, timeout=120).json()
        assert adapted["adapter"] == "demo"
        assert adapted["answer"] != base["answer"]  # random LoRA weights change the output
        assert httpx.delete(f"{url}/adapters/demo", timeout=60).status_code == 204
        again = httpx.post(f"{url}/ask", json=q, timeout=120).json()
        assert again["answer"] == base["answer"]
        # streamed over TCP: the answer in several pieces that join into the same answer
        pieces, done = [], None
        with httpx.stream("POST", f"{url}/ask", json={**q, "stream": True}, timeout=120) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: ") :]
                elif line.startswith("data: ") and kind == "token":
                    pieces.append(json.loads(line[len("data: ") :])["text"])
                elif line.startswith("data: ") and kind == "done":
                    done = json.loads(line[len("data: ") :])
        assert len(pieces) > 3 and done is not None
        assert "".join(pieces) == done["answer"] == base["answer"]
        metrics = httpx.get(f"{url}/metrics").text
        assert 'route="/ask"' in metrics


def test_serve_refuses_an_index_built_with_another_encoder(tmp_path: Path, tiny_generators):
    import numpy as np

    from app.contracts import Passage
    from app.retrieval.store import PassageIndex

    PassageIndex.build(
        [Passage("d#0", "d", "t", "x")], np.ones((1, 8), dtype=np.float32), "some-other-encoder"
    ).save(tmp_path / "index" / "other")
    env = {
        "LORAG_INDEX_DIR": str(tmp_path / "index"),
        "LORAG_INDEX_NAME": "other",
        "LORAG_GENERATOR": str(tiny_generators["t5"]),
        "LORAG_CACHE_DIR": str(tmp_path / "cache"),
    }
    with serve(env, expect_ready=False) as (_, proc):
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "refusing to serve" in out and "some-other-encoder" in out
