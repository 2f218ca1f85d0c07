"""/v1/chat/completions in lorag's terms: a conversation becomes an ask, answers become choices.

The last message is the question: retrieval searches with it, and the messages before it are
the history the generator reads (after lorag's RAG instructions, a client's system messages
joining them). With `retrieval: false` no passages are read and the conversation goes through
the model's chat template as it is: plain chat.
"""

from __future__ import annotations

from app.api.ask import passages_out
from app.api.errors import OpenAIError
from app.api.openai_choices import Chunk
from app.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Usage,
)
from app.contracts import Hit
from app.service import AskParams, AskResult, prior_weights

ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


def ask_params(body: ChatCompletionRequest, adapter: str | None, max_tokens: int) -> AskParams:
    """The ask behind every choice; max_tokens is the server's default answer length."""
    *earlier, last = body.messages
    if last.role != "user":
        raise OpenAIError(
            400,
            f"the last message must be the user's question; got a {last.role!r} message",
            param="messages",
        )
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options needs stream: true", param="stream_options")
    return AskParams(
        question=last.text(),
        adapter=adapter,
        top_k=body.top_k,  # None: the adapter's task default, else the server's
        max_new_tokens=body.max_completion_tokens or body.max_tokens or max_tokens,
        mode=body.mode,
        decoding=body.decoding,
        index=body.index,
        sampling=body.sampling(),
        history=tuple((ROLES.get(m.role, m.role), m.text()) for m in earlier),
        retrieval=body.retrieval,
    )


def usage(results: list[AskResult]) -> Usage:
    """The prompt counted once (every choice read the same one), every choice's tokens."""
    prompt = results[0].prompt_tokens
    completion = sum(r.generated_tokens for r in results)
    return Usage.of(prompt, completion)


def completion(
    body: ChatCompletionRequest, cid: str, created: int, results: list[AskResult]
) -> ChatCompletion:
    first = results[0]
    return ChatCompletion(
        id=cid,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r.answer),
                finish_reason="stop" if r.finish_reason == "stop" else "length",
            )
            for i, r in enumerate(results)
        ],
        usage=usage(results),
        system_fingerprint=first.adapter_version,
        citations=passages_out(first.hits, first.weights),
        abstained=first.abstained,
        citations_moved=sum(r.citations_moved for r in results),
    )


class ChatChunks:
    """chat.completion.chunk events: each choice's role first (the first chunk carrying the
    citations, weighted by the prior p(z|x)), then content deltas, then its finish reason. In
    the token and sequence modes a passage's weight is the posterior p(z|x,y), known once the
    answer is: the first choice's finishing chunk repeats the citations with it."""

    def __init__(
        self, body: ChatCompletionRequest, cid: str, created: int, n: int, *, usage: bool
    ) -> None:
        self._head: Chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
        }
        self._n = n
        self._usage = usage

    def _chunk(self, choice: Chunk | None, **extra: object) -> Chunk:
        chunk = {**self._head, "choices": [] if choice is None else [choice], **extra}
        if self._usage:  # as OpenAI: every chunk says usage, null until the last
            chunk.setdefault("usage", None)
        return chunk

    def opening(self, hits: list[Hit]) -> list[Chunk]:
        prior = passages_out(hits, prior_weights([h.score for h in hits]))
        citations = [p.model_dump(mode="json") for p in prior]
        return [
            self._chunk(
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                **({"citations": citations} if i == 0 else {}),
            )
            for i in range(self._n)
        ]

    def piece(self, i: int, text: str) -> Chunk:
        return self._chunk({"index": i, "delta": {"content": text}, "finish_reason": None})

    def finish(self, i: int, result: AskResult) -> Chunk:
        extra: dict[str, object] = {}
        if i == 0 and result.mode != "concat":
            final = passages_out(result.hits, result.weights)
            extra["citations"] = [p.model_dump(mode="json") for p in final]
        if i == 0 and result.adapter_version is not None:
            extra["system_fingerprint"] = result.adapter_version
        choice = {"index": i, "delta": {}, "finish_reason": result.finish_reason}
        return self._chunk(choice, **extra)

    def usage(self, results: list[AskResult]) -> Chunk | None:
        if not self._usage:
            return None
        return self._chunk(None, usage=usage(results).model_dump())
