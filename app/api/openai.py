"""OpenAI's API (/v1), as vLLM serves it: models, chat completions, completions, and vLLM's
runtime LoRA routes, so that clients written for them (the official SDK, lm-eval, load
generators) work unchanged.

A model is the base (its id, GET /v1/models) or an adapter, by name: the `model` field picks
the adapter /ask's `adapter` would. Chat completions are RAG answers (app/api/openai_chat.py);
completions continue text as it is (app/api/openai_completions.py). Errors come in OpenAI's
shape (app/api/errors.py), and LORAG_API_TOKEN guards these routes as it guards /ask (the
SDK's api_key is sent as that bearer token); the adapter routes take LORAG_ADMIN_TOKEN.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from app.api import adapters, openai_chat, openai_completions
from app.api.ask import observe
from app.api.deps import AdminDep, ApiDep, ServiceDep, StateDep
from app.api.disconnect import unless_disconnected
from app.api.openai_choices import Streams, ask_all, choices, sse_response
from app.api.openai_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorBody,
    LoraLoad,
    LoraUnload,
    ModelCard,
    ModelList,
)
from app.contracts import NAME_RE
from app.errors import AdapterNotFound
from app.generation.generator import Generator
from app.state import AppState

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in [
        (400, "Invalid request (OpenAI's shape; `param` names the field)"),
        (401, "Missing or wrong bearer token"),
        (404, "Unknown model (`code`: model_not_found), adapter folder or index"),
        (503, "Not ready yet"),
    ]
}
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


def _generator(state: AppState) -> Generator:
    assert state.components is not None, "a ready service has its components"
    return state.components.generator


def base_id(state: AppState) -> str:
    """The base model's id: the generator's model id (a hub id, or the folder's path)."""
    return _generator(state).model_id


def adapter_of(model: str, state: AppState) -> str | None:
    """The adapter a request's `model` names; None for the base. An unknown name is found
    unknown by the service (after a lazy load, where that is on) and answered 404."""
    if model == base_id(state):
        return None
    if not NAME_RE.match(model):
        raise AdapterNotFound(model)
    return model


def _id(prefix: str, request: Request) -> str:
    return f"{prefix}-{request.state.request_id}"


# models --------------------------------------------------------------------------------


def _cards(state: AppState, service: ServiceDep) -> list[ModelCard]:
    base = base_id(state)
    cards = [ModelCard(id=base, created=int(time.time()), root=base, parent=None)]
    for info in service.registry.list():
        created = int(info.loaded_at.timestamp())
        cards.append(ModelCard(id=info.name, created=created, root=info.path, parent=base))
    return cards


@router.get("/models", response_model=ModelList, dependencies=[ApiDep], responses=ERRORS)
async def list_models(service: ServiceDep, state: StateDep) -> ModelList:
    """The base model and every loaded adapter (an adapter's `parent` is the base)."""
    return ModelList(data=_cards(state, service))


@router.get(
    "/models/{model:path}", response_model=ModelCard, dependencies=[ApiDep], responses=ERRORS
)
async def get_model(model: str, service: ServiceDep, state: StateDep) -> ModelCard:
    for card in _cards(state, service):
        if card.id == model:
            return card
    raise AdapterNotFound(model)


# chat completions ----------------------------------------------------------------------


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    dependencies=[ApiDep],
    responses={**ERRORS, **STREAMED},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: ServiceDep, state: StateDep
) -> ChatCompletion | StreamingResponse:
    """A RAG answer to the last user message, the conversation before it as its history; the
    passages it read in `citations` (a lorag extension, as are `top_k`, `mode`, `decoding`,
    `index` and `retrieval`: the official SDK sends them with `extra_body`).

    Streamed (`stream: true`): chat.completion.chunk events, the first carrying the role and
    the citations, then content deltas that join into the answer, a chunk with each choice's
    finish_reason, with `stream_options.include_usage` one with the usage, then
    `data: [DONE]`."""
    adapter = adapter_of(body.model, state)
    base = openai_chat.ask_params(body, adapter, state.settings.max_new_tokens)
    params = choices(base, body.n)
    cid, created = _id("chatcmpl", request), int(time.time())
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = openai_chat.ChatChunks(body, cid, created, body.n, usage=usage)
        streams = Streams(service, params)
        return await sse_response(streams, chunks, lambda result: observe(state, result))
    # a client that leaves takes its rows out of the engine's queue (app/api/disconnect.py)
    results = await unless_disconnected(request, ask_all(service, params))
    for result in results:
        observe(state, result)
    return openai_chat.completion(body, cid, created, results)


# completions ---------------------------------------------------------------------------


@router.post("/completions", response_model=Completion, dependencies=[ApiDep], responses=ERRORS)
async def completions(
    body: CompletionRequest, request: Request, service: ServiceDep, state: StateDep
) -> Completion:
    """Continue each prompt as it is: no retrieval and no template (a completion continues the
    caller's text, as lm-eval's tasks need, and passages would change its likelihood).

    With `echo` and `logprobs` the prompt's tokens come with their log-probabilities in the
    legacy `logprobs` object (`tokens`, `token_logprobs` and `top_logprobs`, null first, and
    `text_offset`); `max_tokens: 0` then only scores the prompt, as lm-eval's loglikelihood
    tasks ask. Generated tokens are not scored (their entries are null). Decoder-only
    generators only, for logprobs. Not streamed."""
    adapter = adapter_of(body.model, state)
    cid, created = _id("cmpl", request), int(time.time())
    tokenizer = _generator(state).tokenizer
    work = openai_completions.complete(service, tokenizer, body, adapter, cid, created)
    response, results = await unless_disconnected(request, work)
    for result in results:
        observe(state, result)
    return response


# vLLM's runtime adapter routes ---------------------------------------------------------


@router.post(
    "/load_lora_adapter",
    response_class=PlainTextResponse,
    dependencies=[AdminDep],
    responses=ERRORS,
)
async def load_lora_adapter(body: LoraLoad, service: ServiceDep, state: StateDep) -> str:
    """vLLM's alias of PUT /adapters/{lora_name}: load the folder (relative to the adapters
    root) under the name, replacing a loaded one; answered in vLLM's words, as plain text."""
    _, replaced = await adapters.load(
        service, state, body.lora_name, body.lora_path, pinned=body.pinned
    )
    done = "replaced" if replaced else "added"
    return f"Success: LoRA adapter '{body.lora_name}' {done} successfully."


@router.post(
    "/unload_lora_adapter",
    response_class=PlainTextResponse,
    dependencies=[AdminDep],
    responses=ERRORS,
)
async def unload_lora_adapter(body: LoraUnload, service: ServiceDep, state: StateDep) -> str:
    """vLLM's alias of DELETE /adapters/{lora_name}."""
    await adapters.unload(service, state, body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
