"""A catalogue of bad inputs, sent over HTTP to the real app, one app instance per backend.

Each case must get its own 4xx with a `detail` naming the problem, and afterwards the server
must be ready and answer as before: the base model gives the answer it gave before any bad
input, and the adapter loaded at start still gives its own answer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_settings, wait_loaded
from tests.tiny import save_lora_adapter, tiny_llama, tiny_t5

QUESTION = "What are the rings of Zorblax made of?"
TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 4096


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    url: str
    status: int
    needle: str  # a substring the `detail` must hold
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    admin: bool = True  # send the admin token

    def send(self, client: TestClient) -> Any:
        headers = {**(AUTH if self.admin else {}), **self.headers}
        kwargs: dict[str, Any] = {"headers": headers}
        if self.content is not None:
            kwargs["content"] = self.content
        elif self.json is not None:
            kwargs["json"] = self.json
        return client.request(self.method, self.url, **kwargs)


def _ask(body: dict[str, Any]) -> dict[str, Any]:
    return {"question": QUESTION, **body}


def _put(path: str) -> dict[str, Any]:
    return {"path": path}


CASES = [
    # POST /ask: body
    Case("ask-malformed-json", "POST", "/ask", 422, "malformed JSON", content=b'{"question": ',
         headers={"content-type": "application/json"}),
    Case("ask-invalid-utf8", "POST", "/ask", 422, "not valid UTF-8 at byte 14",
         content=b'{"question": "\xff\xfe"}', headers={"content-type": "application/json"}),
    Case("ask-body-is-a-list", "POST", "/ask", 422, "valid dictionary", json=[QUESTION]),
    Case("ask-missing-question", "POST", "/ask", 422, "question: Field required", json={}),
    Case("ask-question-int", "POST", "/ask", 422, "question: Input should be a valid string",
         json={"question": 42}),
    Case("ask-question-empty", "POST", "/ask", 422, "question: String should have at least 1",
         json={"question": ""}),
    Case("ask-question-blank", "POST", "/ask", 422, "is blank", json={"question": "  \n\t "}),
    Case("ask-question-oversized", "POST", "/ask", 422, "at most 2000 characters",
         json={"question": "x" * 2001}),
    Case("ask-question-control-char", "POST", "/ask", 422, "control character '\\x07'",
         json={"question": "ring\x07s?"}),
    Case("ask-question-nul", "POST", "/ask", 422, "control character '\\x00'",
         json={"question": "rings\x00"}),
    Case("ask-top-k-zero", "POST", "/ask", 422, "top_k: Input should be greater than or equal",
         json=_ask({"top_k": 0})),
    Case("ask-top-k-51", "POST", "/ask", 422, "top_k: Input should be less than or equal to 50",
         json=_ask({"top_k": 51})),
    Case("ask-top-k-negative", "POST", "/ask", 422, "top_k", json=_ask({"top_k": -3})),
    Case("ask-top-k-huge", "POST", "/ask", 422, "top_k", json=_ask({"top_k": 10**30})),
    Case("ask-top-k-float", "POST", "/ask", 422, "top_k: Input should be a valid integer",
         json=_ask({"top_k": 2.5})),
    Case("ask-top-k-nan", "POST", "/ask", 422, "top_k", content=b'{"question": "q", "top_k": NaN}',
         headers={"content-type": "application/json"}),
    Case("ask-top-k-string", "POST", "/ask", 422, "top_k: Input should be a valid integer",
         json=_ask({"top_k": "many"})),
    Case("ask-max-new-tokens-zero", "POST", "/ask", 422, "max_new_tokens",
         json=_ask({"max_new_tokens": 0})),
    Case("ask-max-new-tokens-513", "POST", "/ask", 422, "max_new_tokens: Input should be less",
         json=_ask({"max_new_tokens": 513})),
    Case("ask-unknown-mode", "POST", "/ask", 422, "mode: Input should be 'concat'",
         json=_ask({"mode": "beam"})),
    Case("ask-unknown-decoding", "POST", "/ask", 422, "decoding: Input should be 'thorough'",
         json=_ask({"decoding": "greedy"})),
    Case("ask-extra-field", "POST", "/ask", 422, "top_n: Extra inputs are not permitted",
         json=_ask({"top_n": 3})),
    Case("ask-bad-temperature", "POST", "/ask", 422, "temperature: Input should be less than",
         json=_ask({"temperature": 7})),
    Case("ask-unknown-adapter", "POST", "/ask", 404, "adapter 'ghost' is not loaded",
         json=_ask({"adapter": "ghost"})),
    Case("ask-adapter-traversal", "POST", "/ask", 422, "adapter: String should match pattern",
         json=_ask({"adapter": "../good"})),
    Case("ask-adapter-wrong-type", "POST", "/ask", 422, "adapter: Input should be a valid string",
         json=_ask({"adapter": ["good"]})),
    Case("ask-wrong-content-type", "POST", "/ask", 422, "valid dictionary",
         content=QUESTION.encode(), headers={"content-type": "text/plain"}),
    Case("ask-oversized-body-413", "POST", "/ask", 413, f"exceeds the limit of {MAX_BODY} bytes",
         json={"question": "x" * (MAX_BODY + 10)}),
    Case("ask-wrong-method-405", "GET", "/ask", 405, "Method Not Allowed"),
    Case("unknown-route-404", "GET", "/nowhere", 404, "Not Found"),
    # PUT /adapters/{name}: the folder path
    Case("put-path-dotdot", "PUT", "/adapters/x", 422, "contains '..'", json=_put("../x")),
    Case("put-path-absolute", "PUT", "/adapters/x", 422, "is absolute", json=_put("/etc")),
    Case("put-path-climbs", "PUT", "/adapters/x", 422, "contains '..'", json=_put("a/../../b")),
    Case("put-path-backslash", "PUT", "/adapters/x", 422, "backslash", json=_put("..\\good")),
    Case("put-path-nul", "PUT", "/adapters/x", 422, "control character '\\x00'",
         json=_put("good\x00")),
    Case("put-path-empty", "PUT", "/adapters/x", 422, "path: String should have at least 1",
         json=_put("")),
    Case("put-path-blank", "PUT", "/adapters/x", 422, "is empty", json=_put("   ")),
    Case("put-path-oversized", "PUT", "/adapters/x", 422, "at most 512 characters",
         json=_put("a" * 513)),
    Case("put-path-missing-folder", "PUT", "/adapters/x", 404,
         "no adapter folder 'missing' under the adapters root", json=_put("missing")),
    Case("put-path-is-a-file", "PUT", "/adapters/x", 422, "is not a folder",
         json=_put("good/adapter_config.json")),
    Case("put-symlink-escapes-root", "PUT", "/adapters/x", 422,
         "resolves outside the adapters root", json=_put("escape")),
    Case("put-file-symlink-escapes-root", "PUT", "/adapters/x", 422,
         "links outside the adapters root", json=_put("linked-config")),
    Case("put-wrong-shapes", "PUT", "/adapters/x", 422, "has shape", json=_put("wrong-shapes")),
    Case("put-truncated-safetensors", "PUT", "/adapters/x", 422, "corrupt or truncated",
         json=_put("truncated")),
    Case("put-only-pickle", "PUT", "/adapters/x", 422, "adapter_model.bin (a pickle",
         json=_put("pickle-only")),
    Case("put-missing-config", "PUT", "/adapters/x", 422, "has no adapter_config.json",
         json=_put("no-config")),
    Case("put-config-invalid-json", "PUT", "/adapters/x", 422, "is not valid JSON",
         json=_put("bad-json")),
    Case("put-config-not-object", "PUT", "/adapters/x", 422, "is not a JSON object",
         json=_put("list-config")),
    Case("put-not-lora", "PUT", "/adapters/x", 422, "peft_type 'PREFIX_TUNING'",
         json=_put("prefix")),
    Case("put-body-extra-field", "PUT", "/adapters/x", 422, "rank: Extra inputs are not permitted",
         json={"path": "good", "rank": 4}),
    Case("put-body-pinned-wrong-type", "PUT", "/adapters/x", 422, "pinned: Input should be",
         json={"path": "good", "pinned": "forever"}),
    Case("put-missing-body", "PUT", "/adapters/x", 422, "Field required"),
    # the name in the URL
    Case("put-name-space", "PUT", "/adapters/bad%20name", 422, "name: String should match",
         json=_put("good")),
    Case("put-name-leading-dot", "PUT", "/adapters/.hidden", 422, "name: String should match",
         json=_put("good")),
    Case("put-name-too-long", "PUT", "/adapters/" + "n" * 65, 422, "name: String should match",
         json=_put("good")),
    # %2F is decoded before routing: no route matches a name with a slash in it
    Case("put-name-encoded-slash", "PUT", "/adapters/a%2F..%2Fb", 404, "Not Found",
         json=_put("good")),
    Case("get-name-nul", "GET", "/adapters/a%00b", 422, "name: String should match"),
    Case("get-unknown-adapter", "GET", "/adapters/ghost", 404, "adapter 'ghost' is not loaded"),
    Case("delete-unknown-adapter", "DELETE", "/adapters/ghost", 404, "'ghost' is not loaded"),
    Case("patch-adapter-405", "PATCH", "/adapters/good", 405, "Method Not Allowed",
         json=_put("good")),
    # the admin token
    Case("put-without-token-401", "PUT", "/adapters/x", 401, "LORAG_ADMIN_TOKEN",
         json=_put("good"), admin=False),
    Case("put-wrong-token-401", "PUT", "/adapters/x", 401, "token required", json=_put("good"),
         admin=False, headers={"Authorization": "Bearer nope"}),
    Case("put-basic-scheme-401", "PUT", "/adapters/x", 401, "token required", json=_put("good"),
         admin=False, headers={"Authorization": f"Basic {TOKEN}"}),
    Case("delete-without-token-401", "DELETE", "/adapters/good", 401, "token required",
         admin=False),
]  # fmt: skip


def _other_size_model(backend: str, root: Path) -> Path:
    """The same architecture as the tiny backend but another width: its adapters cannot fit."""
    if backend == "t5":
        return tiny_t5(root, seed=3, name="t5-16", width=16)
    return tiny_llama(root, seed=3, name="llama-16", width=16)


def _bad_adapters(model_dir: Path, other_model: Path, root: Path, outside: Path) -> None:
    """Fill the adapters root with one good adapter and one folder per way of being bad."""
    good = save_lora_adapter(model_dir, root / "good", seed=1)
    config = json.loads((good / "adapter_config.json").read_text())
    weights = (good / "adapter_model.safetensors").read_bytes()

    def folder(name: str, files: dict[str, bytes]) -> None:
        (root / name).mkdir()
        for fname, data in files.items():
            (root / name / fname).write_bytes(data)

    cfg_bytes = json.dumps(config).encode()
    folder(
        "truncated",
        {
            "adapter_config.json": cfg_bytes,
            "adapter_model.safetensors": weights[: len(weights) // 2],
        },
    )
    folder("pickle-only", {"adapter_config.json": cfg_bytes, "adapter_model.bin": b"\x80\x04N."})
    folder("no-config", {"adapter_model.safetensors": weights})
    folder(
        "bad-json",
        {
            "adapter_config.json": b'{"peft_type": "LORA", "r": 8,',
            "adapter_model.safetensors": weights,
        },
    )
    folder("list-config", {"adapter_config.json": b"[1, 2]", "adapter_model.safetensors": weights})
    prefix = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": 4,
        "task_type": config["task_type"],
    }
    folder(
        "prefix",
        {"adapter_config.json": json.dumps(prefix).encode(), "adapter_model.safetensors": weights},
    )
    save_lora_adapter(other_model, root / "wrong-shapes", seed=1)
    # a good adapter outside the root, reached by a folder link and by a file link
    save_lora_adapter(model_dir, outside / "stolen", seed=2)
    os.symlink(outside / "stolen", root / "escape")
    folder("linked-config", {"adapter_model.safetensors": weights})
    os.symlink(
        outside / "stolen" / "adapter_config.json", root / "linked-config" / "adapter_config.json"
    )


@dataclass
class Served:
    client: TestClient
    base_answer: str
    good_answer: str
    good_version: str


@pytest.fixture(scope="module", params=["t5", "llama"])
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    index_root: Path,
    tiny_generators: dict[str, Path],
) -> Iterator[Served]:
    backend: str = request.param
    work = tmp_path_factory.mktemp(f"bad-{backend}")
    root, outside = work / "adapters", work / "outside"
    root.mkdir()
    outside.mkdir()
    _bad_adapters(tiny_generators[backend], _other_size_model(backend, work), root, outside)
    settings = make_settings(
        tiny_generators[backend],
        index_root,
        root,
        admin_token=TOKEN,
        max_body_bytes=MAX_BODY,
        lazy_load_adapters=False,
    )
    from app.main import create_app

    with TestClient(create_app(settings)) as client:
        wait_loaded(client)
        base = client.post("/ask", json={"question": QUESTION, "top_k": 2})
        assert base.status_code == 200, base.text
        put = client.put("/adapters/good", json={"path": "good"}, headers=AUTH)
        assert put.status_code == 201, put.text
        good = client.post("/ask", json={"question": QUESTION, "top_k": 2, "adapter": "good"})
        assert good.status_code == 200, good.text
        assert good.json()["answer"] != base.json()["answer"]  # the adapter is visible
        yield Served(client, base.json()["answer"], good.json()["answer"], put.json()["version"])


def _still_serving(served: Served) -> None:
    client = served.client
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    base = client.post("/ask", json={"question": QUESTION, "top_k": 2})
    assert base.status_code == 200 and base.json()["answer"] == served.base_answer, base.text
    good = client.post("/ask", json={"question": QUESTION, "top_k": 2, "adapter": "good"})
    assert good.status_code == 200, good.text
    assert good.json()["answer"] == served.good_answer
    assert good.json()["adapter_version"] == served.good_version
    names = [a["name"] for a in client.get("/adapters").json()["adapters"]]
    assert "x" not in names  # no bad PUT left anything loaded


def test_catalogue_is_large_and_ids_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gets_4xx_naming_the_problem(served: Served, case: Case) -> None:
    resp = case.send(served.client)
    assert resp.status_code == case.status, resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str), detail
    assert case.needle in detail, detail
    _still_serving(served)


def test_concurrent_put_and_delete_of_one_name_never_5xx(served: Served) -> None:
    client = served.client

    def put(_: int) -> int:
        return client.put("/adapters/churn", json={"path": "good"}, headers=AUTH).status_code

    def delete(_: int) -> int:
        return client.delete("/adapters/churn", headers=AUTH).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(put if i % 2 == 0 else delete, i) for i in range(12)]
        codes = [f.result(timeout=60) for f in futures]
    assert all(c in (200, 201, 204, 404) for c in codes), codes
    assert any(c in (200, 201) for c in codes), codes
    # the registry agrees with itself: listed iff gettable, and gone after one more delete
    listed = "churn" in [a["name"] for a in client.get("/adapters").json()["adapters"]]
    assert client.get("/adapters/churn").status_code == (200 if listed else 404)
    assert client.delete("/adapters/churn", headers=AUTH).status_code == (204 if listed else 404)
    deadline = time.monotonic() + 5
    while client.get("/adapters/churn").status_code != 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/adapters/churn").status_code == 404
    _still_serving(served)
