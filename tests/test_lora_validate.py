"""Adapter refusals: each names the problem, and nothing already installed is disturbed.

Bad adapters are made from real PEFT adapters by the edit a careless or hostile client could
make: wrong shapes, a target the base lacks, a pickle instead of safetensors, a cut file, a
path that climbs out of the adapters root.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.contracts import GenRow, Passage
from app.errors import AdapterInvalid, AdapterPathNotFound, UnsafePath
from app.generation.loading import load_generator
from app.lora.paths import resolve_under
from app.lora.registry import AdapterRegistry
from tests.tiny import save_lora_adapter, tiny_bart, tiny_llama, tiny_t5

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "t5": tiny_t5,
    "bart": tiny_bart,
    "llama": tiny_llama,
}
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / CONFIG
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def first_a(t: dict[str, torch.Tensor]) -> str:
    return sorted(k for k in t if ".lora_A." in k)[0]


def make_bad(root: Path, good: Path, kind: str, outside: Path) -> dict[str, str]:
    """Bad adapters under root, by name -> a fragment the refusal message must contain."""
    want: dict[str, str] = {}

    def copy(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    def grow(t: dict[str, torch.Tensor]) -> None:
        k = first_a(t)
        t[k] = torch.randn(t[k].shape[0], t[k].shape[1] + 3)

    edit_tensors(copy("wide"), grow)  # an adapter for a wider base
    want["wide"] = "has shape"
    edit_config(copy("rank"), r=4)  # config says r=4, tensors have r=8
    want["rank"] = "with r=4 needs"
    edit_config(copy("target"), target_modules=["q" if kind == "t5" else "q_proj", "nonexistent"])
    want["target"] = "module(s) ['nonexistent'] of adapter 'target' are not in base model"

    def drop_b(t: dict[str, torch.Tensor]) -> None:
        del t[sorted(k for k in t if ".lora_B." in k)[0]]

    edit_tensors(copy("half"), drop_b)
    want["half"] = "lacks lora_B"

    def stray(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.lm_head.weight"] = torch.zeros(2, 2)

    edit_tensors(copy("stray"), stray)
    want["stray"] = "'base_model.model.lm_head.weight'"

    def nan(t: dict[str, torch.Tensor]) -> None:
        t[first_a(t)][0, 0] = float("nan")

    edit_tensors(copy("nan"), nan)
    want["nan"] = "not finite"
    pickled = copy("pickled")
    (pickled / WEIGHTS).rename(pickled / "adapter_model.bin")
    want["pickled"] = "safetensors is required"
    cut = copy("cut")
    data = (cut / WEIGHTS).read_bytes()
    (cut / WEIGHTS).write_bytes(data[: len(data) // 2])
    want["cut"] = f"{WEIGHTS} in adapter 'cut' is corrupt or truncated"
    garbage = copy("garbage")
    (garbage / WEIGHTS).write_bytes(b"\xff" * 64)
    want["garbage"] = "corrupt or truncated"
    edit_config(copy("task"), task_type="CAUSAL_LM" if kind != "llama" else "SEQ_2_SEQ_LM")
    want["task"] = "task_type"
    edit_config(copy("ia3"), peft_type="IA3")
    want["ia3"] = "only LORA"
    edit_config(copy("zero"), r=0)
    want["zero"] = "r=0"
    edit_config(copy("dora"), use_dora=True)
    want["dora"] = "use_dora"
    (copy("badjson") / CONFIG).write_text("{not json")
    want["badjson"] = "not valid JSON"
    (copy("noconfig") / CONFIG).unlink()
    want["noconfig"] = f"has no {CONFIG}"
    (root / "afile").write_text("x")
    want["afile"] = "is not a folder"
    (root / "linked").mkdir()
    (root / "linked" / CONFIG).write_text((good / CONFIG).read_text())
    os.symlink(outside / WEIGHTS, root / "linked" / WEIGHTS)
    want["linked"] = "links outside"
    return want


@pytest.fixture(scope="module", params=list(BUILDERS))
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[AdapterRegistry, dict[str, str], Path]:
    tmp = tmp_path_factory.mktemp(request.param)
    model_dir = BUILDERS[request.param](tmp)
    root = tmp / "adapters"
    good = save_lora_adapter(model_dir, root / "good", seed=1)
    outside = save_lora_adapter(model_dir, tmp / "outside", seed=2)
    os.symlink(outside, root / "escape")  # a link in the root to a folder outside it
    want = make_bad(root, good, request.param, outside)
    reg = AdapterRegistry(load_generator(str(model_dir), cache_dir=tmp), root)
    reg.install("good", reg.prepare("good"))
    return reg, want, outside


ROW = GenRow("Where is Alpha?", [Passage("a#0", "a", "Alpha", "Alpha is a town.")], None, 8)


def test_each_refusal_names_the_problem_and_disturbs_nothing(
    setup: tuple[AdapterRegistry, dict[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, want, _ = setup

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called on an adapter")

    monkeypatch.setattr(torch, "load", no_pickle)
    peft = reg.peft_name("good")
    gen = reg.generator
    before = gen.generate([ROW, GenRow(ROW.question, ROW.passages, peft, 8)])
    assert before[0] != before[1]  # the installed adapter matters, so a disturbance would show
    for name, fragment in want.items():
        with pytest.raises((AdapterInvalid, UnsafePath)) as err:
            reg.install(name, reg.prepare(name))
        assert fragment in str(err.value), (name, str(err.value))
        if name != "afile":
            assert repr(name) in str(err.value)  # the message names the adapter
    assert [i.name for i in reg.list()] == ["good"] and reg.peft_name("good") == peft
    assert list(gen.model.peft_config) == [peft]
    assert gen.generate([ROW, GenRow(ROW.question, ROW.passages, peft, 8)]) == before


def test_unsafe_paths_are_refused(setup: tuple[AdapterRegistry, dict[str, str], Path]) -> None:
    reg, _, outside = setup
    cases = {
        "../outside": "'..'",
        "good/../../outside": "'..'",
        str(outside): "absolute",
        "/etc": "absolute",
        "": "empty",
        " ": "empty",
        ".": "empty",
        "go\x00od": "control character",
        "go\nod": "control character",
        "escape": "outside the adapters root",  # symlink escape
        "escape/": "outside the adapters root",
        "good\\..\\..": "backslash",
    }
    for rel, fragment in cases.items():
        with pytest.raises(UnsafePath) as err:
            reg.prepare(rel)
        assert fragment in str(err.value) and repr(rel) in str(err.value), rel
    with pytest.raises(AdapterPathNotFound, match="'missing/x'"):
        reg.prepare("missing/x")
    assert [i.name for i in reg.list()] == ["good"]


def test_resolve_under_accepts_nested_and_inner_links(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(tmp_path / "a" / "b", tmp_path / "inner")
    assert resolve_under(tmp_path, "a/b") == (tmp_path / "a" / "b").resolve()
    assert resolve_under(tmp_path, "./a/b/") == (tmp_path / "a" / "b").resolve()
    assert resolve_under(tmp_path, "inner") == (tmp_path / "a" / "b").resolve()
