"""Training on tiny seeded models: each objective lowers held-out loss on both backends; a trained
adapter serves the same through plain PEFT and through the registry; Ctrl-C leaves nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from app.cli import training_config
from app.contracts import GenRow, Passage
from app.generation.generator import Generator
from app.generation.loading import load_generator
from app.lora.registry import AdapterRegistry
from app.settings import Settings
from app.training.eval import heldout_loss
from app.training.losses import Sample
from app.training.model import add_lora
from app.training.options import TrainOptions
from app.training.train import SUMMARY_NAME, _train_loop, train_adapter
from tests.tiny import load_tiny, tiny_bart, tiny_llama, tiny_t5

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "t5": tiny_t5,
    "bart": tiny_bart,
    "llama": tiny_llama,
}
COLORS = ["red", "blue", "green", "gold"]


def _samples(n: int, offset: int = 0) -> list[Sample]:
    """Questions whose answer is the color named in the first of two passages (prior favors it)."""
    out = []
    for i in range(offset, offset + n):
        color = COLORS[i % len(COLORS)]
        gold = Passage(f"g{i}", f"g{i}", "Paint", f"Box {i} is {color}.")
        other = Passage(f"o{i}", f"o{i}", "Note", f"Box {i + 1} is far.")
        out.append(Sample(f"Color of box {i}?", color, (gold, other), (2.0, 0.0)))
    return out


def _write(path: Path, samples: list[Sample]) -> Path:
    rows = [
        {
            "question": s.question,
            "answer": s.answer,
            "passages": [{"title": p.title, "text": p.text} for p in s.passages],
        }
        for s in samples
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", params=["bart", "llama"])  # one seq2seq, one causal
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


# BART stands for the seq2seq backend: tiny T5 (initializer_factor=4) starts at ~30 nats/token
# and a few LoRA steps do not reliably lower that at any rate tried
CASES = [(b, o) for b in ("bart", "llama") for o in ("concat", "token", "sequence")]


@pytest.mark.parametrize(("backend", "objective"), CASES)
def test_a_few_steps_lower_heldout_loss(backend: str, objective: str, tmp_path: Path) -> None:
    g = load_generator(str(BUILDERS[backend](tmp_path)), cache_dir=tmp_path)
    opts = TrainOptions(
        data=tmp_path / "unused.jsonl",
        name="t",
        objective=objective,  # type: ignore[arg-type]
        rank=8,
        alpha=16,
        dropout=0.0,
        target_modules="all-linear",
        lr=5e-3,
        epochs=2,
        batch_size=2,
    )
    add_lora(g, opts, kind=g.kind)
    train, held = _samples(8), _samples(4, offset=100)
    before = heldout_loss(g, held, opts.objective, batch_size=4, reserve=8)
    losses, _ = _train_loop(g, train, opts, 8, None)
    after = heldout_loss(g, held, opts.objective, batch_size=4, reserve=8)
    assert len(losses) == 8
    assert after < before - 0.1, (before, after)


@dataclasses.dataclass(frozen=True)
class Trained:
    model_dir: Path
    adapter: Path
    summary: dict[str, object]
    data: Path


@pytest.fixture(scope="module")
def trained(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("trained")
    data = _write(tmp / "colors.jsonl", _samples(20))
    settings = Settings(adapters_dir=tmp / "adapters", cache_dir=tmp / "cache")
    opts = TrainOptions(
        data=data,
        name="colors",
        base=str(model_dir),
        rank=4,
        alpha=8,
        lr=1e-2,
        epochs=2,
        heldout=0.2,
        target_modules="all-linear",
        eval_max_new_tokens=6,
    )
    result = train_adapter(opts, training_config(settings))
    return Trained(model_dir, result.path, result.summary, data)


def test_saved_folder_and_summary(trained: Trained) -> None:
    files = sorted(p.name for p in trained.adapter.iterdir())
    assert files == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "lorag_task.json",
        SUMMARY_NAME,
    ]
    task = json.loads((trained.adapter / "lorag_task.json").read_text())
    assert task["question_encoder"] is None and task["encoder"] is None
    assert task["mode"] == "concat" and task["top_k"] == 5
    assert task["generator"]["fingerprint"] == s_base_fingerprint(trained)
    assert [p.name for p in trained.adapter.parent.iterdir()] == ["colors"]  # no temp left
    s = trained.summary
    assert s["data"] == {  # type: ignore[comparison-overlap]
        "file": str(trained.data),
        "sha256": hashlib.sha256(trained.data.read_bytes()).hexdigest(),
        "examples": 20,
        "train": 16,
        "heldout": 4,
    }
    metrics: dict[str, dict[str, float]] = s["metrics"]  # type: ignore[assignment]
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert metrics["before"]["examples"] == 4
    base: dict[str, object] = s["base"]  # type: ignore[assignment]
    assert base["model_id"] == str(trained.model_dir.resolve())
    assert isinstance(base["fingerprint"], str) and len(base["fingerprint"]) == 16
    assert s["options"]["rank"] == 4  # type: ignore[index]
    config = json.loads((trained.adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained.model_dir.resolve())


def s_base_fingerprint(trained: Trained) -> object:
    base: dict[str, object] = trained.summary["base"]  # type: ignore[assignment]
    return base["fingerprint"]


def test_plain_peft_and_registry_serve_the_same(trained: Trained, tmp_path: Path) -> None:
    question, passages = "Color of box 7?", _samples(8)[7].passages
    # the registry path: what the server does
    g: Generator = load_generator(str(trained.model_dir), cache_dir=tmp_path)
    base_answer = g.generate([GenRow(question, passages, None, 6)])[0]
    registry = AdapterRegistry(g, trained.adapter.parent)
    registry.install("colors", registry.prepare("colors"))
    internal = registry.peft_name("colors")
    served = g.generate([GenRow(question, passages, internal, 6)])[0]
    prompt = g.prompt(question, passages, 6)
    enc = g._encode([prompt], g.max_input_tokens(6))
    served_logits = g.forward([internal], **_score_inputs(g, enc))
    # the reference: plain PEFT on a fresh base
    peft = PeftModel.from_pretrained(load_tiny(trained.model_dir), str(trained.adapter)).eval()
    with torch.inference_mode():
        out = peft.generate(**enc, max_new_tokens=6, do_sample=False, num_beams=1)
        ref_logits = peft(**_score_inputs(g, enc))
    new = out[:, 1:] if g.kind == "seq2seq" else out[:, enc["input_ids"].shape[1] :]
    torch.testing.assert_close(served_logits.logits, ref_logits.logits, rtol=1e-4, atol=1e-4)
    assert served == g._decode(new[0])
    base_logits = g.forward([None], **_score_inputs(g, enc)).logits
    assert not torch.allclose(base_logits, ref_logits.logits, atol=1e-3)  # the adapter matters
    assert isinstance(base_answer, str)


def _score_inputs(g: Generator, enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if g.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.zeros_like(enc["input_ids"][:, :3])
    return inputs


def test_interrupt_leaves_no_folder(tmp_path: Path) -> None:
    model_dir = tiny_llama(tmp_path)
    data = _write(tmp_path / "d.jsonl", _samples(12))
    root = tmp_path / "adapters"
    settings = Settings(adapters_dir=root, cache_dir=tmp_path / "cache")
    opts = TrainOptions(data=data, name="x", base=str(model_dir), batch_size=2, heldout=0.0)

    def ctrl_c(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapter(opts, training_config(settings), on_step=ctrl_c)
    assert not root.exists() or list(root.iterdir()) == []


def test_qlora_adapter_serves_on_full_precision_base(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    # layers wide enough for bitsandbytes' 64-value quantization blocks; init_range 0.1, not
    # tiny_llama's 0.5, is the spread this test was written on (it passes on 0.5 too)
    model_dir = tiny_llama(tmp_path, name="llama-128", width=128, init_range=0.1)
    data = _write(tmp_path / "d.jsonl", _samples(10))
    settings = Settings(adapters_dir=tmp_path / "adapters", cache_dir=tmp_path / "cache")
    opts = TrainOptions(
        data=data,
        name="q",
        base=str(model_dir),
        qlora=True,
        lr=5e-3,
        epochs=2,
        batch_size=2,
        dropout=0.0,
        target_modules="all-linear",
        heldout=0.2,
        eval_max_new_tokens=0,
    )
    result = train_adapter(opts, training_config(settings))
    assert result.summary["base"]["quantization"] == "nf4+double-quant"  # type: ignore[index]
    metrics: dict[str, dict[str, float]] = result.summary["metrics"]  # type: ignore[assignment]
    assert metrics["after"]["loss"] < metrics["before"]["loss"] - 0.5
    # served the usual way (full-precision base, through the registry) it is about as good
    served = metrics["after_on_full_precision_base"]["loss"]
    assert served == pytest.approx(metrics["after"]["loss"], rel=0.25)
    assert served < metrics["before"]["loss"] - 0.5
    # and it loads into plain PEFT on the unquantized base
    peft = PeftModel.from_pretrained(load_tiny(model_dir), str(result.path))
    assert any("lora_A" in n for n, _ in peft.named_parameters())


def test_examples_without_passages_get_the_index_top_k(index_root: Path, tmp_path: Path) -> None:
    from app.retrieval.encoders import load_encoder
    from app.retrieval.memory_store import MemoryStore
    from app.retrieval.retriever import Retriever
    from app.retrieval.store import PassageIndex
    from app.training.data import load_examples
    from app.training.train import resolve_samples

    data = tmp_path / "d.jsonl"
    rows = [
        {"question": "Which gas giant orbits Quell?", "answer": "Zorblax"},
        {"question": "q", "answer": "a", "passages": ["given"]},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = Settings(index_dir=index_root, index_name="facts")
    samples = resolve_samples(load_examples(data), training_config(settings), top_k=3)
    # the reference: the retriever the server uses, on the same index
    encoder = load_encoder("default", "sentence-transformers")
    hits = Retriever(encoder, MemoryStore(PassageIndex.load(index_root / "facts"))).retrieve(
        [rows[0]["question"]], 3
    )[0]
    assert samples[0].passages == tuple(h.passage for h in hits)
    assert samples[0].scores == pytest.approx([h.score for h in hits])
    assert samples[0].passages[0].doc_id == "zorblax"
    assert [p.text for p in samples[1].passages] == ["given"] and samples[1].scores is None
