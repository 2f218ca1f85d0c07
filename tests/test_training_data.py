"""Training data checks (every error names file and line, before any model loads), the held-out
split, the answer metrics against SQuAD's definitions, and LoRA target selection per architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import training_config
from app.errors import InvalidInputError
from app.settings import Settings
from app.training.data import TrainingDataError, load_examples, split_heldout
from app.training.eval import cited, exact_match, score_answers, token_f1
from app.training.model import target_modules
from app.training.options import TrainOptions
from app.training.train import train_adapter
from tests.tiny import load_tiny, tiny_bart, tiny_llama, tiny_t5

GOOD = {"question": "What is Alpha?", "answer": "a town"}


def _write(tmp_path: Path, lines: list[str | bytes]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    return path


def test_parses_questions_answers_and_both_passage_forms(tmp_path: Path) -> None:
    rows = [
        GOOD,
        {**GOOD, "passages": ["Alpha is a town.", "Beta is a city."]},
        {
            **GOOD,
            "passages": [{"title": "A", "text": "x", "score": 2}, {"text": "y", "score": 1.5}],
        },
    ]
    examples = load_examples(_write(tmp_path, [json.dumps(r) for r in rows] + [""]))
    assert [e.line for e in examples] == [1, 2, 3]
    assert examples[0].passages is None
    assert [p.text for p in examples[1].passages or ()] == ["Alpha is a town.", "Beta is a city."]
    assert examples[1].scores is None
    assert examples[2].scores == (2.0, 1.5)
    assert [p.title for p in examples[2].passages or ()] == ["A", ""]


BAD = [
    ({"answer": "x"}, "missing field 'question'"),
    ({"question": "q"}, "missing field 'answer'"),
    ({"question": "q", "answer": "  "}, "field 'answer' must be a non-empty string"),
    ({"question": "q", "answer": 3}, "field 'answer' must be a non-empty string"),
    ({"question": "q", "answer": "x" * 1001}, "has 1001 characters; the limit is 1000"),
    ({**GOOD, "passages": []}, "'passages' must be a non-empty list"),
    ({**GOOD, "passages": [{"title": "t"}]}, "passages[0] needs a non-empty 'text'"),
    ({**GOOD, "passages": [5]}, "passages[0] must be a string or an object"),
    ({**GOOD, "passages": [{"text": "a", "score": "hi"}]}, "passages[0].score must be a finite"),
    ({**GOOD, "passages": [{"text": "a", "score": 1}, "b"]}, "a score for every passage or"),
]


@pytest.mark.parametrize(("record", "message"), BAD)
def test_bad_record_names_file_and_line(tmp_path: Path, record: object, message: str) -> None:
    path = _write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), json.dumps(record)])
    with pytest.raises(TrainingDataError) as err:
        load_examples(path)
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)
    assert err.value.line == 3


def test_bad_json_non_utf8_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match=r"data.jsonl:2: not valid JSON"):
        load_examples(_write(tmp_path, [json.dumps(GOOD), "{oops"]))
    with pytest.raises(TrainingDataError, match=r"data.jsonl:2: expected a JSON object"):
        load_examples(_write(tmp_path, [json.dumps(GOOD), "[1, 2]"]))
    latin1 = json.dumps({"question": "Qué?", "answer": "sí"}, ensure_ascii=False).encode("latin-1")
    with pytest.raises(TrainingDataError, match=r"data.jsonl:3: not UTF-8"):
        load_examples(_write(tmp_path, [json.dumps(GOOD), json.dumps(GOOD), latin1]))
    with pytest.raises(TrainingDataError, match=r"data.jsonl: holds no examples"):
        load_examples(_write(tmp_path, ["", "   "]))
    with pytest.raises(TrainingDataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")


def test_answer_limit_is_configurable(tmp_path: Path) -> None:
    path = _write(tmp_path, [json.dumps({"question": "q", "answer": "four"})])
    assert load_examples(path, max_answer_chars=4)[0].answer == "four"
    with pytest.raises(TrainingDataError, match="has 4 characters; the limit is 3"):
        load_examples(path, max_answer_chars=3)


def test_bad_data_fails_before_any_model_loads(tmp_path: Path) -> None:
    # the base does not exist: reaching the model load would raise something else entirely
    data = _write(tmp_path, [json.dumps(GOOD), json.dumps({"question": "q"})])
    opts = TrainOptions(data=data, name="x", base=str(tmp_path / "no-such-model"))
    settings = Settings(adapters_dir=tmp_path / "adapters", cache_dir=tmp_path / "cache")
    with pytest.raises(TrainingDataError, match=r"data.jsonl:2: missing field 'answer'"):
        train_adapter(opts, training_config(settings))
    assert not (tmp_path / "adapters" / "x").exists()


def test_existing_adapter_needs_force(tmp_path: Path) -> None:
    (tmp_path / "adapters" / "x").mkdir(parents=True)
    data = _write(tmp_path, [json.dumps(GOOD)])
    settings = Settings(adapters_dir=tmp_path / "adapters", cache_dir=tmp_path / "cache")
    with pytest.raises(InvalidInputError, match="exists; pass --force"):
        train_adapter(TrainOptions(data=data, name="x", base="unused"), training_config(settings))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", 0, "rank must be at least 1"),
        ("name", "../up", "adapter name '../up' is invalid"),
        ("objective", "mse", "objective 'mse'"),
        ("heldout", 1.0, "heldout must be in"),
        ("dropout", -0.1, "dropout must be in"),
        ("last_layers", 0, "last_layers must be at least 1"),
    ],
)
def test_options_reject_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        TrainOptions(data=Path("d.jsonl"), **{"name": "ok", field: value})  # type: ignore[arg-type]


def test_heldout_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    rows = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(20)]
    examples = load_examples(_write(tmp_path, rows))
    train, held = split_heldout(examples, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert sorted(e.line for e in train + held) == list(range(1, 21))
    assert split_heldout(examples, 0.1, seed=3) == (train, held)
    assert split_heldout(examples, 0.1, seed=4)[1] != held
    assert split_heldout(examples[:1], 0.5, seed=0) == (examples[:1], [])  # keeps one to train
    assert split_heldout(examples, 0.0, seed=0)[1] == []


def test_answer_metrics_follow_squad() -> None:
    # SQuAD normalization: case, punctuation and articles do not count
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # F1 = 2PR/(P+R): "big red dog" vs "red dog": P=2/3, R=1 -> 0.8
    assert token_f1("a big red dog", "the red dog") == pytest.approx(0.8)
    assert token_f1("cat", "dog") == 0.0
    assert cited("Alpha is a town [2].") == 2
    assert cited("Alpha [1] is a town.") is None
    scores = score_answers(["a town [2].", "a city"], ["a town [2].", "a town [1]."])
    assert scores["cite_rate"] == 0.5 and scores["cite_match"] == 0.5
    assert scores["exact_match"] == 0.5 and scores["mean_words"] == 2.5


@pytest.mark.parametrize(
    ("builder", "attention", "linear_count"),
    [
        (tiny_t5, ["k", "o", "q", "v"], 6),  # + wi, wo
        (tiny_bart, ["k_proj", "out_proj", "q_proj", "v_proj"], 6),  # + fc1, fc2
        (tiny_llama, ["k_proj", "o_proj", "q_proj", "v_proj"], 7),  # + gate, up, down
    ],
)
def test_target_modules_per_architecture(
    tmp_path: Path, builder: object, attention: list[str], linear_count: int
) -> None:
    model = load_tiny(builder(tmp_path))  # type: ignore[operator]
    assert target_modules(model, "attention") == attention
    every = target_modules(model, "all-linear")
    assert set(attention) < set(every) and len(every) == linear_count
    assert "lm_head" not in every
    assert target_modules(model, f"{attention[0]}, {attention[-1]}") == [
        attention[0],
        attention[-1],
    ]
    with pytest.raises(InvalidInputError, match=r"\['nope'\] are not linear layers"):
        target_modules(model, "nope")


def test_cli_train_subcommand_reports_bad_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from app.training.cli import add_train_parser

    parser = argparse.ArgumentParser(prog="lorag")
    adapter = parser.add_subparsers(dest="command").add_parser("adapter")
    add_train_parser(adapter.add_subparsers(dest="action"), lambda: training_config(Settings()))
    data = _write(tmp_path, [json.dumps(GOOD), json.dumps({"answer": "x"})])
    monkeypatch.setenv("LORAG_ADAPTERS_DIR", str(tmp_path / "adapters"))
    args = parser.parse_args(
        ["adapter", "train", "--data", str(data), "--name", "n", "--rank", "4", "--qlora"]
    )
    assert (args.rank, args.qlora, args.objective, args.target_modules) == (
        4,
        True,
        "concat",
        "attention",
    )
    assert args.func(args) == 2
    assert f"{data}:2: missing field 'question'" in capsys.readouterr().err
