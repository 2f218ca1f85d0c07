"""/v1/completions: plain text continuation, and the score of a prompt, as lm-eval asks them.

No retrieval applies here: a completion continues the caller's text as it is (template "raw",
no chat template, no passages), which is what lm-eval's tasks need, and passages put before the
text would change its likelihood. A decoder-only generator is needed for log-probabilities.

`logprobs` (with `echo`) are the prompt's: each prompt token's log-probability given the tokens
before it, from one teacher-forced pass (RagService.prompt_logprobs), and the `logprobs`
likeliest tokens at its position (the token itself added, as vLLM does). With `max_tokens: 0`
that is all (a loglikelihood request); with `max_tokens > 0` the generated tokens follow, one
entry each with null log-probabilities: lorag does not score what it generates. lm-eval's
loglikelihood requests (max_tokens 1, echo, logprobs 1) drop that last entry.

Not streamed: the generator strips an answer's leading whitespace as it decodes it, and only
the finished answer's tokens say what it was (`continuation`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

from app.api.errors import OpenAIError
from app.api.openai_choices import ask_all, choices
from app.api.openai_schemas import (
    MAX_PROMPTS,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Logprobs,
    Usage,
)
from app.service import AskParams, AskResult, RagService

Scored = list[tuple[int, float | None, list[tuple[int, float]]]]  # RagService.prompt_logprobs


def prompts_of(body: CompletionRequest) -> list[str]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or len(prompts) * body.n > MAX_PROMPTS:
        raise OpenAIError(
            400,
            f"prompts x n must be 1 to {MAX_PROMPTS} choices, got {len(prompts)} x {body.n}",
            param="prompt",
        )
    if body.max_tokens == 0 and not body.echo:
        raise OpenAIError(
            400,
            "max_tokens 0 generates nothing: it is allowed with echo (the prompt, scored with "
            "logprobs)",
            param="max_tokens",
        )
    if body.logprobs is not None and not body.echo:
        raise OpenAIError(
            400,
            f"logprobs {body.logprobs} without echo asks for the generated tokens' "
            "log-probabilities, which lorag does not compute; send echo: true for the prompt's",
            param="logprobs",
        )
    if body.stream:
        raise OpenAIError(
            400,
            "stream: /v1/completions answers whole (/v1/chat/completions streams)",
            param="stream",
        )
    return prompts


def ask_params(body: CompletionRequest, prompts: list[str], adapter: str | None) -> list[AskParams]:
    """Every choice's ask, prompt by prompt (choice index = prompt * n + j)."""
    asks: list[AskParams] = []
    for prompt in prompts:
        base = AskParams(
            question=prompt,
            adapter=adapter,
            top_k=None,
            max_new_tokens=body.max_tokens,
            sampling=body.sampling(),
            retrieval=False,
            template="raw",
        )
        asks += choices(base, body.n)
    return asks


async def complete(
    service: RagService,
    tokenizer: PreTrainedTokenizerBase,
    body: CompletionRequest,
    adapter: str | None,
    cid: str,
    created: int,
) -> tuple[Completion, list[AskResult]]:
    """The whole response, and the answers it generated (for the metrics)."""
    prompts = prompts_of(body)
    # the prompt pass: its logprobs, or (max_tokens 0) the count of its tokens. One after the
    # other, on the model thread anyway; the generation after it, if any
    scoring = body.logprobs is not None or body.max_tokens == 0
    top = body.logprobs or 0
    scored = [await service.prompt_logprobs(adapter, p, top) for p in prompts] if scoring else []
    results = await ask_all(service, ask_params(body, prompts, adapter)) if body.max_tokens else []
    out: list[CompletionChoice] = []
    prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        prompt_tokens += len(scored[p][1]) if scoring else results[p * body.n].prompt_tokens
        for j in range(body.n):
            k = p * body.n + j
            result = results[k] if results else None
            completion = continuation(tokenizer, result) if result is not None else ""
            logprobs = None
            if body.logprobs is not None:
                generated = result.token_ids if result is not None else ()
                logprobs = legacy_logprobs(tokenizer, scored[p][1], generated, prompt)
            out.append(
                CompletionChoice(
                    index=k,
                    text=(prompt if body.echo else "") + completion,
                    logprobs=logprobs,
                    finish_reason="stop" if result and result.finish_reason == "stop" else "length",
                )
            )
    generated_tokens = sum(r.generated_tokens for r in results)
    version = results[0].adapter_version if results else scored[0][0]
    response = Completion(
        id=cid,
        created=created,
        model=body.model,
        choices=out,
        usage=Usage.of(prompt_tokens, generated_tokens),
        system_fingerprint=version,
    )
    return response, results


def continuation(tokenizer: PreTrainedTokenizerBase, result: AskResult) -> str:
    """The completion as it continues the prompt. The generator strips an answer's whitespace
    (stop strings are matched on the stripped text), but a continuation's first token is
    often " word": its leading whitespace, decoded from the tokens, is put back."""
    if result.answer[:1].isspace():  # kept
        return result.answer
    text = _decode(tokenizer, result.token_ids, skip_special=True)
    return text[: len(text) - len(text.lstrip())] + result.answer


def legacy_logprobs(
    tokenizer: PreTrainedTokenizerBase, scored: Scored, generated: Sequence[int], prompt: str
) -> Logprobs:
    """OpenAI's legacy logprobs object over the prompt's tokens, then the generated ones (not
    scored: null). Token strings are each token decoded alone (special tokens shown)."""

    def piece(token: int) -> str:
        return _decode(tokenizer, [token], skip_special=False)

    def text(ids: Sequence[int]) -> str:
        return _decode(tokenizer, ids, skip_special=True)

    ids = [token for token, _, _ in scored]
    top: list[dict[str, float] | None] = []
    for token, logprob, alts in scored:
        if logprob is None:
            top.append(None)
            continue
        likeliest: dict[str, float] = {}
        for alt, value in [*alts, (token, logprob)]:  # alternatives likeliest first
            likeliest.setdefault(piece(alt), value)  # two that decode alike: the likelier
        top.append(likeliest)
    return Logprobs(
        tokens=[piece(t) for t in [*ids, *generated]],
        token_logprobs=[logprob for _, logprob, _ in scored] + [None] * len(generated),
        top_logprobs=top + [None] * len(generated),
        text_offset=[
            *text_offsets(text, ids),
            *(len(prompt) + o for o in text_offsets(text, generated)),
        ],
    )


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], *, skip_special: bool) -> str:
    text = tokenizer.decode(
        list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False
    )
    assert isinstance(text, str)
    return text


def text_offsets(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> list[int]:
    """Where each token's text starts in decode(ids). Decoded incrementally (as vLLM's and
    TGI's detokenizers do): each token's text is what it adds to the decoded window before it,
    so a token whose bytes end inside a character adds nothing until the one completing it."""
    offsets: list[int] = []
    done = 0  # characters decoded so far
    prefix = read = 0  # ids[prefix:read]: the context window decoded before the next token
    for t in range(len(ids)):
        offsets.append(done)
        before = decode(ids[prefix:read])
        now = decode(ids[prefix : t + 1])
        if now.endswith("\ufffd"):  # mid-character: wait for the rest of its bytes
            continue
        done += len(now) - len(before)
        prefix, read = read, t + 1
    return offsets
