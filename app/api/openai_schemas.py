"""Schemas of the OpenAI-compatible routes (/v1): OpenAI's field names and defaults, lorag's
extensions marked as such (what the official SDK sends through `extra_body`).

Request bodies forbid unknown fields, so a client that asks for something lorag does not do
(tools, logit_bias, response_format) gets a 400 naming the field instead of a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.schemas import ADAPTER_NAME, INDEX_NAME, PassageOut
from app.contracts import Decoding, Mode, Sampling

MAX_TOKENS = 512  # as /ask's max_new_tokens
MAX_CHOICES = 8  # n: each choice is one more answer decoded
MAX_PROMPTS = 16  # /v1/completions' prompt list; its choices, prompts x n, at most as many
MAX_SEED = 2**62  # choice i samples with seed + i
GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily (vLLM's _SAMPLING_EPS)

EXTENSION = "lorag extension: "

Stop = Annotated[str, Field(min_length=1)]


# shared request fields -------------------------------------------------------------------


class _Sampled(BaseModel):
    """What chat and text completions share: the model, sampling, stops, choices."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        ...,
        min_length=1,
        max_length=256,
        description="The base model's id or a loaded adapter's name (GET /v1/models). With "
        "LORAG_LAZY_LOAD_ADAPTERS, a folder under the adapters root is loaded on first use.",
    )
    temperature: float = Field(
        1.0,
        ge=0.0,
        le=2.0,
        description="OpenAI's default, 1: sampled. 0 (or below 1e-5, as in vLLM): greedy, "
        "which LORAG_NUM_BEAMS > 1 needs.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Sample within this nucleus.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Makes a sample reproducible, whatever else shares the batch; choice i of "
        "n samples with seed + i.",
    )
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = Field(
        None, description="Up to 4 strings that end the answer (not included in it)."
    )
    n: int = Field(
        1,
        ge=1,
        le=MAX_CHOICES,
        description="Choices: n answers decoded independently (choice i with seed + i), "
        "sharing nothing but the request.",
    )
    user: str | None = Field(None, max_length=256, description="Accepted and not used.")
    presence_penalty: float = Field(
        0.0, ge=0.0, le=0.0, description="Only 0: lorag applies no penalties."
    )
    frequency_penalty: float = Field(
        0.0, ge=0.0, le=0.0, description="Only 0: lorag applies no penalties."
    )

    def sampling(self) -> Sampling:
        stop = self.stop or ()
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        # below GREEDY_BELOW, logits / temperature overflows: greedy is what it means
        temperature = 0.0 if self.temperature < GREEDY_BELOW else self.temperature
        return Sampling(temperature, self.top_p, self.seed, stops)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(
        False, description="Send a last chunk with the usage (and no choices) before [DONE]."
    )


# chat completions ------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is read as system."
    )
    content: str | list[TextPart] = Field(description="Text, or text parts (joined).")
    name: str | None = Field(None, max_length=256, description="Accepted and not used.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessage] = Field(
        ...,
        min_length=1,
        max_length=256,
        description="The conversation, oldest first; the last message is the user's question, "
        "which retrieval searches with. The messages before it are the history the answer "
        "reads.",
    )
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Answer length; default LORAG_MAX_NEW_TOKENS."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="As max_tokens (OpenAI's newer name); wins."
    )
    stream: bool = Field(
        False,
        description="Answer as server-sent chat.completion.chunk events, then `data: [DONE]`.",
    )
    stream_options: StreamOptions | None = None
    # lorag's RAG options
    retrieval: bool = Field(
        True,
        description=EXTENSION + "false: plain chat, no passages; the conversation goes "
        "through the model's chat template as it is.",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        le=50,
        description=EXTENSION + "passages to retrieve (default: the adapter's task, else "
        "LORAG_TOP_K).",
    )
    mode: Mode | None = Field(
        None,
        description=EXTENSION + "concat, token (RAG-Token) or sequence (RAG-Sequence), as on "
        "POST /ask; default LORAG_MODE.",
    )
    decoding: Decoding = Field(
        "thorough", description=EXTENSION + "RAG-Sequence's rescoring: thorough or fast."
    )
    index: str | None = Field(
        None, pattern=INDEX_NAME, description=EXTENSION + "a named index; default the active one."
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(
        description="Tokens the generator read: the prompt with its passages (every passage "
        "row's prompt in the token and sequence modes); counted once for n choices."
    )
    completion_tokens: int = Field(description="Tokens generated, end tokens included.")
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = Field(
        None, description="The adapter version that answered (content hash); none for the base."
    )
    citations: list[PassageOut] = Field(
        description=EXTENSION + "the passages the answer read, as POST /ask's `passages` "
        "(weights: the first choice's); empty without retrieval."
    )
    abstained: bool = Field(
        False,
        description=EXTENSION + "the passages do not support an answer (LORAG_ABSTAIN): the "
        "first choice says the documents do not contain it, as POST /ask's `abstained`.",
    )
    citations_moved: int = Field(
        0,
        description=EXTENSION + "citation marks [n] the citation check moved to the passage "
        "holding what they cite (LORAG_CHECK_CITATIONS), over all choices, as POST /ask's "
        "`citations_moved`.",
    )


# text completions ------------------------------------------------------------------------


class CompletionRequest(_Sampled):
    prompt: str | list[str] = Field(
        ...,
        description="Text to continue, or a list of them (choice index = prompt * n + j; at "
        f"most {MAX_PROMPTS} choices in all). No retrieval and no template: the prompt is the "
        "model's whole input.",
    )
    max_tokens: int = Field(
        16,
        ge=0,
        le=MAX_TOKENS,
        description="OpenAI's default, 16. 0 (with echo): generate nothing, score the prompt.",
    )
    echo: bool = Field(False, description="Return the prompt before the completion.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="With echo: the prompt tokens' log-probabilities and this many likeliest "
        "alternatives at each position. Generated tokens get entries with null values.",
    )
    stream: bool = Field(
        False, description="Only false: completions are answered whole (chat streams)."
    )


class Logprobs(BaseModel):
    """OpenAI's legacy completions logprobs: one entry per token, the first one unscored."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# models and adapters ---------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time: when the adapter was loaded; now for the base.")
    owned_by: str = "lorag"
    root: str = Field(description="The base's id; an adapter's folder under the adapters root.")
    parent: str | None = Field(description="An adapter's base model id; null for the base.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoraLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(..., pattern=ADAPTER_NAME, description="The name to serve it as.")
    lora_path: str = Field(
        ...,
        min_length=1,
        max_length=512,
        description="The adapter folder, relative to the adapters root (LORAG_ADAPTERS_DIR).",
    )
    load_inplace: bool = Field(
        False, description="Accepted; a loaded name is always replaced, as PUT /adapters does."
    )
    pinned: bool = Field(False, description=EXTENSION + "never evict it (see PUT /adapters).")


class LoraUnload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(..., pattern=ADAPTER_NAME)
    lora_int_id: int | None = Field(None, description="Accepted and not used.")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorInfo
