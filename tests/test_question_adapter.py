"""Question-encoder LoRA trained jointly with the generator, on a tiny sentence-transformers BERT
and a tiny generator: gradients reach q(x) through p(z|x) and move it the way the marginal
likelihood says; passages (so the index) stay as they were; the saved bundle serves the same in
lorag and in plain PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from torch import Tensor
from transformers import BertModel

from app.cli import training_config
from app.contracts import Passage
from app.errors import InvalidInputError
from app.generation.generator import Generator
from app.generation.loading import load_generator
from app.lora.bundle import MANIFEST_NAME, QUESTION_DIR, prepare_task, read_manifest
from app.lora.question_adapters import QuestionAdapters
from app.retrieval.encoders import SentenceTransformerEncoder, load_encoder
from app.retrieval.question_tower import tower_of
from app.settings import Settings
from app.training.losses import Sample, batch_nll
from app.training.options import TrainOptions
from app.training.question import pick_top_k
from app.training.train import train_adapter
from tests.tiny import tiny_bart, tiny_llama
from tests.tiny_encoders import dpr_folder, tiny_sentence_transformer

# every word is in the tiny BERT's vocabulary (tests/tiny_encoders.WORDS)
PASSAGES = [
    Passage("g#0", "g", "", "the glacier ice flows"),
    Passage("p#0", "p", "", "a piano hammer and strings made sound"),
    Passage("b#0", "b", "", "bread yeast rises"),
    Passage("l#0", "l", "", "the lake of eel and tide"),
]
QUESTIONS = [
    ("what is the glacier", "ice"),
    ("how does a piano make sound", "hammer"),
    ("why did bread rise", "yeast"),
    ("where is the eel", "lake"),
    ("what made the sound", "strings"),
    ("how does the ice flow", "glacier"),
    ("what rises in bread", "yeast"),
    ("who was in the lake", "eel"),
]


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sentence_transformer(tmp_path_factory.mktemp("st"))


def _data(path: Path) -> Path:
    rows = [
        {
            "question": q,
            "answer": a,
            "passages": [{"title": p.title, "text": p.text} for p in PASSAGES],
        }
        for q, a in QUESTIONS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _nll(g: Generator, objective: str, q: np.ndarray, d: np.ndarray) -> Tensor:
    """[n] each question's marginal answer NLL over the 4 passages, its prior from q @ d.T."""
    return torch.stack([
        batch_nll(
            g, [Sample(question, answer, tuple(PASSAGES), None)], objective,  # type: ignore[arg-type]
            reserve=8, doc_scores=torch.from_numpy(q[b : b + 1] @ d.T).requires_grad_(True),
        )[0]
        for b, (question, answer) in enumerate(QUESTIONS)
    ])  # fmt: skip


def _preferred(g: Generator, objective: str, q: np.ndarray, d: np.ndarray) -> list[int]:
    """Per question, the passage whose prior score the marginal likelihood's gradient raises
    most at the base encoder's scores: where training pushes p(z|x), under its objective."""
    out = []
    for b, (question, answer) in enumerate(QUESTIONS):
        scores = torch.from_numpy(q[b : b + 1] @ d.T).requires_grad_(True)  # [1, 4]
        sample = Sample(question, answer, tuple(PASSAGES), None)
        nll, _ = batch_nll(g, [sample], objective, reserve=8, doc_scores=scores)  # type: ignore[arg-type]
        (grad,) = torch.autograd.grad(nll, scores)
        out.append(int(torch.argmin(grad[0])))
    return out


def _priors(encoder: SentenceTransformerEncoder, q: np.ndarray) -> np.ndarray:
    d = encoder.encode_passages(PASSAGES)  # [4, H]
    s = torch.from_numpy(q @ d.T)  # [n, 4]
    return torch.softmax(s, dim=-1).numpy()


# no dropout: training runs the generator in train mode, and dropout's noise in a random tiny
# model's likelihoods would make "the passage it prefers" a coin toss from step to step
BUILDERS = {"llama": tiny_llama, "bart": lambda tmp: tiny_bart(tmp, dropout=0.0)}


@pytest.mark.parametrize(("backend", "objective"), [("llama", "token"), ("bart", "sequence")])
def test_joint_training_moves_the_prior_toward_the_generators_choice(
    backend: str, objective: str, st_dir: Path, tmp_path: Path
) -> None:
    model_dir = BUILDERS[backend](tmp_path)
    encoder = load_encoder(str(st_dir), "sentence-transformers")
    assert isinstance(encoder, SentenceTransformerEncoder)
    questions = [q for q, _ in QUESTIONS]
    base_q = encoder.encode_questions(questions)
    base_passages = encoder.encode_passages(PASSAGES)
    g = load_generator(str(model_dir), cache_dir=tmp_path)  # the base generator, untrained
    preferred = _preferred(g, objective, base_q, base_passages)
    settings = Settings(
        adapters_dir=tmp_path / "adapters", cache_dir=tmp_path / "cache", encoder=str(st_dir)
    )
    opts = TrainOptions(
        data=_data(tmp_path / "d.jsonl"),
        name="task",
        base=str(model_dir),
        objective=objective,  # type: ignore[arg-type]
        rank=4,
        alpha=8,
        dropout=0.0,
        lr=1e-6,  # the generator nearly frozen, so the passage it prefers stays the same
        question_lr=3e-2,
        question_encoder=True,
        question_target_modules="query,key,value",
        top_k=4,
        candidates=4,
        epochs=6,
        batch_size=4,
        heldout=0.0,
    )
    result = train_adapter(opts, training_config(settings))
    bundle = result.path
    assert (bundle / QUESTION_DIR / "adapter_model.safetensors").is_file()
    assert not (bundle / QUESTION_DIR / "adapter_model.bin").exists()
    manifest = read_manifest(bundle, "task")
    assert manifest is not None
    assert manifest.question_encoder == QUESTION_DIR and manifest.encoder == encoder.fingerprint
    assert manifest.mode == objective and manifest.top_k == 4

    # the reference: plain PEFT on the encoder's own transformer
    bert = BertModel.from_pretrained(st_dir.parent / "bert").eval()
    peft = PeftModel.from_pretrained(bert, str(bundle / QUESTION_DIR)).eval()
    tower = tower_of(encoder)
    with torch.no_grad():
        trained_q = tower.encode(questions, peft).numpy()
    # gradients flowed: the question vectors moved, and p(preferred|x) went up on average
    assert not np.allclose(trained_q, base_q, atol=1e-4)
    rows = np.arange(len(QUESTIONS))
    before = _priors(encoder, base_q)[rows, preferred]
    after = _priors(encoder, trained_q)[rows, preferred]
    assert after.mean() > before.mean() + 1e-3, (before, after)
    # and what training minimizes fell: the answers' marginal NLL under the trained prior, the
    # generator held at the base (its learning rate leaves it nearly so). A tiny encoder can
    # not raise every question's choice at once (one shared shift serves most), so this, not a
    # count of rows, is the property
    with torch.no_grad():
        nll_before = _nll(g, objective, base_q, base_passages)
        nll_after = _nll(g, objective, trained_q, base_passages)
    assert float(nll_after.sum()) < float(nll_before.sum()) - 0.1, (nll_before, nll_after)
    assert (after > before).sum() >= len(QUESTIONS) // 2, (before, after)
    # the passage side is untouched: same vectors from the server's encoder as before training
    np.testing.assert_array_equal(encoder.encode_passages(PASSAGES), base_passages)
    np.testing.assert_array_equal(encoder.encode_questions(questions), base_q)

    # lorag's serving path gives the same question vectors as plain PEFT
    adapters = QuestionAdapters(encoder)
    task = prepare_task(
        settings.adapters_dir, "task", encoder_fingerprint=encoder.fingerprint,
        question_layout=adapters.layout,
    )  # fmt: skip
    assert task.question is not None
    adapters.install("task", task.question)
    np.testing.assert_allclose(adapters.encode(questions, "task"), trained_q, atol=1e-5)
    np.testing.assert_array_equal(encoder.encode_questions(questions), base_q)  # still the base
    summary = result.summary["question_encoder"]
    assert summary["encoder"] == encoder.fingerprint  # type: ignore[index]


def test_pick_top_k_matches_a_full_sort() -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 8, requires_grad=True)
    d = [torch.randn(5, 8), torch.randn(2, 8), torch.randn(6, 8)]
    samples = [Sample(f"q{i}", "a", tuple(PASSAGES[j % 4] for j in range(len(v))), None)
               for i, v in enumerate(d)]  # fmt: skip
    picked, scores = pick_top_k(q, samples, d, 3)
    assert scores.shape == (3, 3)
    for b, v in enumerate(d):
        full = (v @ q[b]).detach()
        ref = torch.sort(full, descending=True).values[:3]
        torch.testing.assert_close(scores[b, : len(ref)].detach(), ref)
        assert len(picked[b].passages) == len(ref)
    assert torch.isinf(scores[1, 2]) and scores[1, 2] < 0  # 2 candidates: padded
    scores[torch.isfinite(scores)].sum().backward()
    assert q.grad is not None and bool(q.grad.abs().sum() > 0)


def test_question_encoder_with_concat_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="token or sequence"):
        TrainOptions(data=tmp_path / "d", name="x", question_encoder=True, objective="concat")
    with pytest.raises(InvalidInputError, match=r"candidates \(3\) must be at least top_k \(5\)"):
        TrainOptions(
            data=tmp_path / "d", name="x", question_encoder=True, objective="token", candidates=3
        )


def test_manifest_file_name() -> None:
    assert MANIFEST_NAME == "lorag_task.json"


def test_tower_without_adapter_equals_the_servers_encoder(st_dir: Path, tmp_path: Path) -> None:
    """Both encoder kinds: the tower's three steps reproduce encode_questions exactly, and a
    question adapter served by QuestionAdapters equals plain PEFT on the same transformer."""
    from peft import LoraConfig, get_peft_model
    from transformers import DPRContextEncoder, DPRQuestionEncoder

    from app.lora.validate import validate_adapter

    q_dir = dpr_folder(tmp_path, DPRQuestionEncoder, 1, projection_dim=16)
    c_dir = dpr_folder(tmp_path, DPRContextEncoder, 2, projection_dim=16)
    encoders = {
        "st": load_encoder(str(st_dir), "sentence-transformers"),
        "dpr": load_encoder(str(q_dir), "dpr", context_spec=str(c_dir)),
    }
    questions = [q for q, _ in QUESTIONS]
    for kind, encoder in encoders.items():
        tower = tower_of(encoder)
        with torch.no_grad():
            np.testing.assert_allclose(
                tower.encode(questions).numpy(), encoder.encode_questions(questions), atol=1e-5
            )
        torch.manual_seed(0)
        config = LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
        folder = tmp_path / f"{kind}-adapter"
        get_peft_model(tower.copy_transformer(), config).save_pretrained(str(folder))
        adapters = QuestionAdapters(encoder)
        adapters.install("a", validate_adapter(folder, tmp_path, adapters.layout(), rel=kind))
        reference = PeftModel.from_pretrained(tower.copy_transformer(), str(folder)).eval()
        with torch.no_grad():
            want = tower.encode(questions, reference).numpy()
        got = adapters.encode(questions, "a")
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert not np.allclose(got, encoder.encode_questions(questions), atol=1e-3)
        assert adapters.discard("a") and "a" not in adapters and adapters.info("a") is None


def test_cli_refuses_question_encoder_with_concat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.training.cli import main

    monkeypatch.setenv("LORAG_ADAPTERS_DIR", str(tmp_path / "adapters"))
    data = _data(tmp_path / "d.jsonl")
    assert main(["--data", str(data), "--name", "x", "--question-encoder"]) == 2
    assert "--question-encoder needs --objective token or sequence" in capsys.readouterr().err
    assert not (tmp_path / "adapters").exists()


def test_candidate_vectors_are_the_encoders_passage_vectors(st_dir: Path) -> None:
    from app.training.question import candidate_vectors

    encoder = load_encoder(str(st_dir), "sentence-transformers")
    samples = [  # shared candidates are embedded once but land in every row that has them
        Sample("q0", "a", (PASSAGES[0], PASSAGES[2]), None),
        Sample("q1", "a", (PASSAGES[2], PASSAGES[1], PASSAGES[3]), None),
    ]
    got = candidate_vectors(encoder, samples)
    for s, v in zip(samples, got, strict=True):
        np.testing.assert_allclose(v.numpy(), encoder.encode_passages(s.passages), atol=1e-6)


def test_heldout_evaluation_uses_the_trained_question_encoder(st_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        adapters_dir=tmp_path / "adapters", cache_dir=tmp_path / "cache", encoder=str(st_dir)
    )
    opts = TrainOptions(
        data=_data(tmp_path / "d.jsonl"),
        name="held",
        base=str(tiny_llama(tmp_path)),
        objective="token",
        question_encoder=True,
        question_lr=5e-2,
        top_k=2,
        candidates=4,
        heldout=0.25,
        max_steps=2,
        eval_max_new_tokens=0,
    )
    summary = train_adapter(opts, training_config(settings)).summary
    metrics: dict[str, dict[str, float]] = summary["metrics"]  # type: ignore[assignment]
    assert metrics["before"]["examples"] == 2 and metrics["after"]["examples"] == 2
    changed = summary["question_encoder"]["heldout_top1_changed"]  # type: ignore[index]
    # the reference: the held-out split, top-1 among its passages by base vs saved adapter
    from app.training.data import load_examples, split_heldout

    _, held = split_heldout(load_examples(opts.data), opts.heldout, opts.seed)
    encoder = load_encoder(str(st_dir), "sentence-transformers")
    tower = tower_of(encoder)
    bert = BertModel.from_pretrained(st_dir.parent / "bert").eval()
    peft = PeftModel.from_pretrained(bert, str(settings.adapters_dir / "held" / QUESTION_DIR))
    d = encoder.encode_passages(PASSAGES)  # [4, H]
    with torch.no_grad():
        qs = [e.question for e in held]
        base_top = (encoder.encode_questions(qs) @ d.T).argmax(1)
        tuned_top = (tower.encode(qs, peft.eval()).numpy() @ d.T).argmax(1)
    assert changed == pytest.approx(float(np.mean(base_top != tuned_top)))
