"""Adapter residency: the eviction plan, budgets in the registry, pinning, usage, lazy loads,
and the merge policy (merged output vs per-row LoRA, and the base restored after unmerge)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel

from app.contracts import GenRow, Passage
from app.errors import AdapterNotFound
from app.generation.generator import Generator
from app.generation.loading import load_generator
from app.lora.registry import AdapterRegistry
from app.lora.residency import AdapterBudgetExceeded, ResidencyPolicy, Resident, plan_eviction
from tests.tiny import save_lora_adapter, tiny_t5

P = Passage("a#0", "a", "Alpha", "Alpha is a small town on the river Lek, famous for cheese.")
QUESTION = "What are the rings of Zorblax made of?"


# ---- the plan, on its own -------------------------------------------------------------------


def res(name: str, size: int, tick: int, *, pinned: bool = False, held: bool = False) -> Resident:
    return Resident(name, size, tick, pinned, held)


def test_plan_evicts_least_recently_used_first_and_only_what_is_needed() -> None:
    rs = [res("a", 10, 3), res("b", 10, 1), res("c", 10, 2)]
    assert plan_eviction(rs, "d", 10, None) == []  # unlimited
    assert plan_eviction(rs, "d", 10, 40) == []  # fits
    assert plan_eviction(rs, "d", 10, 30) == ["b"]
    assert plan_eviction(rs, "d", 20, 30) == ["b", "c"]


def test_plan_skips_pinned_and_held_and_counts_a_replaced_name_as_freed() -> None:
    rs = [res("a", 10, 1, pinned=True), res("b", 10, 2, held=True), res("c", 10, 3)]
    assert plan_eviction(rs, "d", 10, 30) == ["c"]
    assert plan_eviction(rs, "c", 10, 30) == []  # replacing c frees c's bytes
    with pytest.raises(AdapterBudgetExceeded) as err:
        plan_eviction(rs, "d", 11, 30)
    msg = str(err.value)
    assert "'d'" in msg and "11 bytes" in msg and "30 bytes" in msg and "20 cannot" in msg


def test_policy_rejects_a_negative_budget_and_reads_zero_as_unlimited() -> None:
    with pytest.raises(ValueError, match="-1"):
        ResidencyPolicy(memory_budget=-1)
    assert ResidencyPolicy.of(0, lazy_load=True, merge_single=False).memory_budget is None


# ---- the registry, on a tiny T5 -------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("residency")
    model_dir = tiny_t5(tmp)
    root = tmp / "adapters"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        save_lora_adapter(model_dir, root / name, seed=seed, r=4)
    return model_dir, root


def make(world: tuple[Path, Path], tmp_path: Path, **policy: object) -> AdapterRegistry:
    gen = load_generator(str(world[0]), cache_dir=tmp_path)
    return AdapterRegistry(gen, world[1], policy=ResidencyPolicy(**policy))  # type: ignore[arg-type]


def generator(reg: AdapterRegistry) -> Generator:
    """The generator make() gave the registry (which types it as the AdapterHost it needs)."""
    assert isinstance(reg.generator, Generator)
    return reg.generator


def lora_tensors(reg: AdapterRegistry) -> int:
    return sum(1 for n, _ in reg.generator.model.named_parameters() if "lora_" in n)


def test_install_over_budget_evicts_the_least_recently_used(world, tmp_path) -> None:
    probe = make(world, tmp_path)
    size = probe.resident_bytes(probe.prepare("a"))
    # 4 bytes per float32 element: the budget counts what the model holds
    assert size == 4 * sum(t.numel() for t in probe.prepare("a").state_dict.values())
    reg = make(world, tmp_path, memory_budget=2 * size)
    for name in ("a", "b"):
        reg.install(name, reg.prepare(name))
    reg.begin_batch(["a", None])  # a used after b was installed: b is now the LRU
    reg.install("c", reg.prepare("c"))
    assert [i.name for i in reg.list()] == ["a", "c"]
    assert reg.evictions == 1
    assert set(reg.generator.model.peft_config) == {reg.peft_name("a"), reg.peft_name("c")}
    assert lora_tensors(reg) == 2 * lora_tensors_one(world, tmp_path)


def lora_tensors_one(world, tmp_path) -> int:
    reg = make(world, tmp_path)
    reg.install("a", reg.prepare("a"))
    return lora_tensors(reg)


def test_pinned_and_held_adapters_stay_and_a_refusal_evicts_nothing(world, tmp_path) -> None:
    probe = make(world, tmp_path)
    size = probe.resident_bytes(probe.prepare("a"))
    reg = make(world, tmp_path, memory_budget=2 * size)
    reg.install("a", reg.prepare("a"), pinned=True)
    reg.install("b", reg.prepare("b"))
    before = set(reg.generator.model.peft_config)
    with reg.hold("b"), pytest.raises(AdapterBudgetExceeded, match=f"budget is {2 * size} bytes"):
        reg.install("c", reg.prepare("c"))
    assert [i.name for i in reg.list()] == ["a", "b"] and reg.evictions == 0
    assert set(reg.generator.model.peft_config) == before
    reg.install("c", reg.prepare("c"))  # b no longer held: it goes, pinned a stays
    assert [(i.name, i.pinned) for i in reg.list()] == [("a", True), ("c", False)]


def test_usage_is_counted_per_row_when_a_batch_begins(world, tmp_path) -> None:
    reg = make(world, tmp_path)
    reg.install("a", reg.prepare("a"))
    reg.install("b", reg.prepare("b"))
    assert reg.get("a").last_used is None and reg.get("a").requests_served == 0
    reg.begin_batch(["a", None, "a", "b", "gone"])
    a, b = reg.get("a"), reg.get("b")
    assert (a.requests_served, b.requests_served) == (2, 1)
    assert a.last_used is not None and a.last_used >= a.loaded_at


# ---- merge policy ---------------------------------------------------------------------------


def row(adapter: str | None) -> GenRow:
    return GenRow(QUESTION, [P], adapter, 10)


def logits(gen: Generator, adapter: str | None) -> torch.Tensor:
    enc = gen._encode([gen.prompt(QUESTION, [P], 10)], 10_000)
    dec = torch.zeros((1, 3), dtype=torch.long)
    return gen.forward([adapter], **enc, decoder_input_ids=dec).logits  # [1, 3, V]


def base_weights(gen: Generator) -> dict[str, torch.Tensor]:
    """The base model's own weights (LoRA layers' base_layer), by their unwrapped names."""
    model = gen.model
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    out = {}
    for name, p in inner.named_parameters():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer", "")] = p.detach().clone()
    return out


# float32: merging changes the rounding (W + sBA vs Wx + sB(Ax)), which this tiny T5's wide
# init amplifies to ~1.5e-3 on logits of size ~47; float64 shows the maths is the same.
LOGIT_TOL = {torch.float32: 5e-3, torch.float64: 1e-9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_single_adapter_matches_per_row_lora_and_unmerge_restores_base(
    world, tmp_path, dtype
) -> None:
    gen = load_generator(str(world[0]), cache_dir=tmp_path)
    gen.model.to(dtype)
    reg = AdapterRegistry(gen, world[1], policy=ResidencyPolicy(merge_single=True))
    base = base_weights(gen)
    base_answer = gen.generate([row(None)])
    reg.install("a", reg.prepare("a"))
    internal = reg.peft_name("a")
    lora_answer = gen.generate([row(internal)])
    lora_logits = logits(gen, internal)
    assert lora_answer != base_answer  # the adapter really changes the output

    reg.begin_batch(["a", "a"])
    assert reg.merged == "a" and reg.peft_name("a") is None
    assert not isinstance(gen.model, PeftModel)  # the plain model serves, LoRA merged in
    assert gen.generate([row(None)]) == lora_answer  # token-identical greedy
    tol = LOGIT_TOL[dtype]
    torch.testing.assert_close(logits(gen, None), lora_logits, atol=tol, rtol=0)

    reg.begin_batch(["a", None])  # a base row: unmerge first
    assert reg.merged is None and reg.peft_name("a") == internal
    assert gen.generate([row(None), row(internal)]) == base_answer + lora_answer
    after = base_weights(gen)
    assert after.keys() == base.keys()
    for name, w in base.items():
        torch.testing.assert_close(after[name], w, atol=1e-6, rtol=0)


def test_a_second_install_unmerges_and_both_adapters_serve(world, tmp_path) -> None:
    reg = make(world, tmp_path, merge_single=True)
    gen = generator(reg)
    reg.install("a", reg.prepare("a"))
    alone = gen.generate([row(reg.peft_name("a"))])
    reg.begin_batch(["a"])
    assert reg.merged == "a"
    reg.install("b", reg.prepare("b"))
    assert reg.merged is None
    reg.begin_batch(["a", "b"])  # two adapters loaded: never merged
    assert reg.merged is None
    a, b = reg.peft_name("a"), reg.peft_name("b")
    both = gen.generate([row(a), row(b)])
    assert both[0] == alone[0] and both[1] != alone[0]
    reg.unload("b")
    reg.begin_batch(["a"])
    assert reg.merged == "a" and gen.generate([row(None)]) == alone
    reg.unload("a")  # unmerges, then unwraps: the plain base serves
    assert reg.merged is None and not isinstance(gen.model, PeftModel)


# ---- over HTTP ------------------------------------------------------------------------------


def ask(client, adapter: str | None = None):
    return client.post("/ask", json={"question": QUESTION, "adapter": adapter, "top_k": 2})


def test_put_pins_and_get_reports_usage_and_budget_refusals(
    client_factory, tiny_generators, adapters_root
) -> None:
    model_dir = tiny_generators["t5"]
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        save_lora_adapter(model_dir, adapters_root / name, seed=seed)
    client = client_factory("t5")
    size = client.put("/adapters/a", json={"path": "a"}).json()["resident_bytes"]
    client.delete("/adapters/a")
    # a second app with room for two adapters
    client = client_factory("t5", adapter_memory_bytes=2 * size)
    assert client.put("/adapters/a", json={"path": "a", "pinned": True}).status_code == 201
    assert client.put("/adapters/b", json={"path": "b"}).status_code == 201
    for _ in range(2):
        assert ask(client, "a").status_code == 200
    listed = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert listed["a"]["pinned"] and not listed["b"]["pinned"]
    assert listed["a"]["requests_served"] == 2 and listed["a"]["last_used"] is not None
    assert listed["b"]["requests_served"] == 0 and listed["b"]["last_used"] is None

    assert client.put("/adapters/c", json={"path": "c"}).status_code == 201  # evicts b
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["a", "c"]
    assert "lorag_adapter_evictions_total 1.0" in client.get("/metrics").text

    client.put("/adapters/c", json={"path": "c", "pinned": True})
    refused = client.put("/adapters/b", json={"path": "b"})
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert f"budget is {2 * size} bytes" in detail and f"needs {size} bytes" in detail
    assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["a", "c"]


def test_ask_lazily_loads_an_adapter_folder_once(
    client_factory, tiny_generators, adapters_root, monkeypatch
) -> None:
    save_lora_adapter(tiny_generators["t5"], adapters_root / "a", seed=1)
    client = client_factory("t5", batch_wait_ms=20.0)
    registry = client.app.state.lorag.service.registry
    prepared: list[str] = []
    real_prepare = registry.prepare

    def counting_prepare(rel: str):
        prepared.append(rel)
        return real_prepare(rel)

    monkeypatch.setattr(registry, "prepare", counting_prepare)

    async def together() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            body = {"question": QUESTION, "adapter": "a", "top_k": 2}
            return list(await asyncio.gather(*(ac.post("/ask", json=body) for _ in range(6))))

    resps = client.portal.call(together)
    assert [r.status_code for r in resps] == [200] * 6
    assert prepared == ["a"]  # six concurrent asks, one load
    version = client.get("/adapters/a").json()["version"]
    assert {r.json()["adapter_version"] for r in resps} == {version}
    assert len({r.json()["answer"] for r in resps}) == 1
    assert ask(client, None).json()["answer"] != resps[0].json()["answer"]  # really adapted

    missing = ask(client, "nope")
    assert missing.status_code == 404 and "'nope'" in missing.json()["detail"]


def test_lazy_loading_off_keeps_unloaded_names_404(
    client_factory, tiny_generators, adapters_root
) -> None:
    save_lora_adapter(tiny_generators["t5"], adapters_root / "a", seed=1)
    client = client_factory("t5", lazy_load_adapters=False)
    resp = ask(client, "a")
    assert resp.status_code == 404 and "'a'" in resp.json()["detail"]
    assert client.get("/adapters").json()["adapters"] == []


# ---- leases: a request runs on the version it was admitted with ------------------------------


def answer(reg: AdapterRegistry, peft: str | None) -> str:
    return generator(reg).generate([GenRow(QUESTION, [P], peft, 6)])[0]


def test_a_leased_version_survives_a_swap_and_is_freed_with_its_last_lease(world, tmp_path):
    reg = make(world, tmp_path)
    reg.install("task", reg.prepare("a"))
    alone_a = answer(reg, reg.peft_name("task"))
    lease = reg.acquire("task")
    reg.install("task", reg.prepare("b"))  # the swap: later requests get b
    alone_b = answer(reg, reg.peft_name("task"))
    assert alone_a != alone_b  # the two versions really differ
    assert reg.get("task").version == reg.prepare("b").version
    # the admitted request still runs on a, the version it leased, still installed (retired)
    assert lease.version == reg.prepare("a").version
    assert answer(reg, reg.peft_name_of(lease)) == alone_a
    both = {lease.internal, reg.peft_name("task")}
    assert set(reg.generator.model.peft_config) == both and len(both) == 2
    reg.begin_batch(["task"])  # a batch while a is still leased frees nothing
    assert set(reg.generator.model.peft_config) == both
    assert reg.release(lease) is True  # the last lease on a retired version
    reg.collect()  # frees a: only b is installed
    assert list(reg.generator.model.peft_config) == [reg.peft_name("task")]
    assert answer(reg, reg.peft_name("task")) == alone_b


def test_unload_of_a_leased_adapter_waits_for_its_requests(world, tmp_path):
    reg = make(world, tmp_path, merge_single=True)
    reg.install("task", reg.prepare("a"))
    expected = answer(reg, reg.peft_name("task"))
    lease = reg.acquire("task")
    reg.unload("task")
    assert "task" not in reg and reg.list() == []
    reg.begin_batch(["task"])  # with a retired version installed, nothing merges
    assert reg.merged is None
    assert answer(reg, reg.peft_name_of(lease)) == expected
    assert reg.release(lease) is True
    reg.collect()
    assert not isinstance(reg.generator.model, PeftModel)  # the base alone, unwrapped
    with pytest.raises(AdapterNotFound):
        reg.peft_name_of(lease)  # a lease given back does not resolve any more
    with pytest.raises(AdapterNotFound):
        reg.acquire("task")


def test_a_leased_adapter_is_not_evicted(world, tmp_path) -> None:
    probe = make(world, tmp_path)
    size = probe.resident_bytes(probe.prepare("a"))
    reg = make(world, tmp_path, memory_budget=2 * size)
    reg.install("a", reg.prepare("a"))
    reg.install("b", reg.prepare("b"))
    reg.begin_batch(["b"])  # a is the least recently used
    lease = reg.acquire("a")
    reg.install("c", reg.prepare("c"))  # evicts b, not the leased a
    reg.release(lease)
    assert [i.name for i in reg.list()] == ["a", "c"]
