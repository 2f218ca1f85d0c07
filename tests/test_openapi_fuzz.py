"""Property-based run of the OpenAPI schema (schemathesis) against the real app: no 5xx.

Every operation in /openapi.json is covered: POST /ask, GET /adapters, GET, PUT and DELETE
/adapters/{name}, POST /documents, GET and DELETE /documents/{doc_id}, GET and PUT /index, POST
/index/{name}/compact, GET /health, /ready and /metrics, and the OpenAI-compatible /v1 routes
(models, chat completions, completions, vLLM's load and unload of LoRA adapters).
Schemathesis generates requests from the schema the app serves, valid ones and (for
operations that take input) invalid ones; each
must be answered without a server error. The app is the real one (real lifespan, encoder and
index, the tiny T5 generator), one instance for the module, called in-process through
Starlette's TestClient; its adapters root holds one real adapter, `good`, so requests that
name it load it. Derandomized and bounded: at most 50 examples per operation.

Schemathesis sends nothing itself: its pytest plugin ends every ASGI lifespan it started at
each test's teardown, which would unload the models between operations, so the cases are
serialized with `as_transport_kwargs` and sent through a client that owns the lifespan.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_settings, wait_loaded
from tests.tiny import save_lora_adapter

# dev dependency: schemathesis>=4.32,<5 (brings hypothesis); skipped, saying so, without it
schemathesis = pytest.importorskip("schemathesis", reason="needs schemathesis (dev extra)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

MAX_EXAMPLES = 50
GOOD = "good"  # the one real adapter under the adapters root
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE

# Every operation of /openapi.json, with the modes it can be fuzzed in (one without input has
# no invalid request); test_fuzz_covers_every_operation fails when one is added.
OPERATIONS = {
    "POST /ask": (POSITIVE, NEGATIVE),
    "GET /adapters": (POSITIVE,),
    "GET /adapters/{name}": (POSITIVE, NEGATIVE),
    "PUT /adapters/{name}": (POSITIVE, NEGATIVE),
    "DELETE /adapters/{name}": (POSITIVE, NEGATIVE),
    "POST /documents": (POSITIVE, NEGATIVE),
    "GET /documents/{doc_id}": (POSITIVE, NEGATIVE),
    "DELETE /documents/{doc_id}": (POSITIVE, NEGATIVE),
    "GET /index": (POSITIVE,),
    "PUT /index": (POSITIVE, NEGATIVE),
    "POST /index/{name}/compact": (POSITIVE, NEGATIVE),
    "GET /health": (POSITIVE,),
    "GET /ready": (POSITIVE,),
    "GET /metrics": (POSITIVE,),
    "GET /v1/models": (POSITIVE,),
    "GET /v1/models/{model}": (POSITIVE,),  # any string is a valid model name to ask about
    "POST /v1/chat/completions": (POSITIVE, NEGATIVE),
    "POST /v1/completions": (POSITIVE, NEGATIVE),
    "POST /v1/load_lora_adapter": (POSITIVE, NEGATIVE),
    "POST /v1/unload_lora_adapter": (POSITIVE, NEGATIVE),
}
RUNS = [(label, mode) for label, modes in OPERATIONS.items() for mode in modes]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    index_root: Path,
    tiny_generators: dict[str, Path],
) -> Iterator[TestClient]:
    import shutil

    from app.main import create_app

    root = tmp_path_factory.mktemp("fuzz") / "adapters"
    save_lora_adapter(tiny_generators["t5"], root / GOOD, seed=1)
    # a private copy: fuzzed POST/DELETE /documents change the index they are sent to
    indexes = root.parent / "index"
    shutil.copytree(index_root / "facts", indexes / "facts")
    app = create_app(make_settings(tiny_generators["t5"], indexes, root))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_loaded(client)
        assert client.get("/ready").status_code == 200
        yield client


@pytest.fixture(scope="module")
def api_schema(served: TestClient) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_dict(served.get("/openapi.json").json())


def _send(client: TestClient, case: schemathesis.Case) -> Any:
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        body["content"] = data.encode() if isinstance(data, str) else data
    return client.request(
        kwargs["method"],
        kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        **body,
    )


def _aim(case: schemathesis.Case, at_good: bool) -> schemathesis.Case:
    if at_good:
        if "name" in (case.path_parameters or {}):
            case.path_parameters = {**(case.path_parameters or {}), "name": GOOD}
        if isinstance(case.body, dict) and "path" in case.body:
            case.body = {**case.body, "path": GOOD}
        if isinstance(case.body, dict):
            named = {"adapter", "model", "lora_name", "lora_path"} & set(case.body)
            case.body = {**case.body, **dict.fromkeys(named, GOOD)}
    return case


def test_fuzz_covers_every_operation(api_schema: schemathesis.schemas.BaseSchema) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), RUNS, ids=[f"{op}-{m.value}" for op, m in RUNS])
def test_no_operation_answers_with_a_server_error(
    served: TestClient,
    api_schema: schemathesis.schemas.BaseSchema,
    label: str,
    mode: GenerationMode,
) -> None:
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label
    statuses: list[int] = []

    strategy = operation.as_strategy(generation_mode=mode)
    if mode is POSITIVE:  # half the valid cases name the real adapter, so it is loaded,
        # replaced, asked with and unloaded too, not only refused as unknown
        strategy = st.tuples(strategy, st.booleans()).map(lambda pair: _aim(*pair))

    @given(case=strategy)
    @settings(
        # both modes of an operation together send at most MAX_EXAMPLES requests
        max_examples=MAX_EXAMPLES // len(OPERATIONS[label]),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        response = _send(served, case)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.method, case.formatted_path, response.text)
        case.validate_response(response, checks=[not_a_server_error])

    run()
    assert statuses  # something was sent
    if mode is NEGATIVE:
        assert any(400 <= s < 500 for s in statuses), statuses  # invalid input was refused
