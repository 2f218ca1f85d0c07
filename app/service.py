"""The RAG service: retrieve, then generate on the engine. The API and the CLI share it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from app.contracts import GREEDY, Decoding, Hit, Mode, Sampling, SearchMode, Template, Turn
from app.engine.coalesce import Coalescer
from app.engine.engine import Engine, Expected
from app.engine.requests import EngineRequest
from app.errors import (
    AdapterNotFound,
    AdapterPathNotFound,
    AdapterStale,
    InvalidInputError,
    NotReadyError,
)
from app.generation.abstain import (
    ABSTAIN_TEXT,
    AbstainConfig,
    gate_cosines,
    refuses,
    ungrounded,
    unsupported,
)
from app.generation.citations import CitationCheck
from app.generation.config import PromptConfig
from app.generation.prompts import prompt_order
from app.lora.bundle import PreparedTask
from app.lora.registry import AdapterInfo, AdapterRegistry, Lease, PreparedAdapter
from app.lora.tasks import TaskBundles
from app.retrieval.filters import MetadataFilter
from app.retrieval.interface import Collection

T = TypeVar("T")

log = logging.getLogger(__name__)


class Retrieves(Protocol):
    def retrieve(
        self,
        questions: Sequence[str],
        k: int,
        *,
        index: str | None = None,
        where: MetadataFilter | None = None,
        mode: SearchMode = "dense",
    ) -> list[list[Hit]]: ...

    def resolve(self, name: str | None) -> Collection: ...


class ScoresPrompts(Protocol):
    def prompt_logprobs(
        self, text: str, adapter: str | None, top: int = 0
    ) -> list[tuple[int, float | None, list[tuple[int, float]]]]: ...


class AdapterSource(Protocol):
    def locate(self, name: str) -> tuple[str, str | None]:
        """The folder (relative to the adapters root) that a lazy load of `name` reads, and the
        version it must have (None: whatever is there)."""
        ...


class _Folders:
    """Without a fleet: a lazy load of `name` reads the folder `name`, whatever it holds."""

    def locate(self, name: str) -> tuple[str, str | None]:
        return name, None


@dataclass(frozen=True)
class PreparedLoad:
    """An adapter folder read and validated, ready to install (no model touched yet)."""

    adapter: PreparedAdapter
    task: PreparedTask

    @property
    def version(self) -> str:
        return self.adapter.version


# top_k, index name, question-adapter name, metadata filter, search mode
RetrievalKey = tuple[int, str | None, str | None, MetadataFilter | None, SearchMode]


@dataclass(frozen=True, slots=True)
class AskParams:
    question: str
    adapter: str | None
    top_k: int | None  # None: the adapter's task default, else the service's
    max_new_tokens: int
    mode: Mode | None = None  # None: the adapter's task default, else the service's
    decoding: Decoding = "thorough"
    index: str | None = None  # a named index; None: the active one
    where: MetadataFilter | None = None  # only passages of documents whose metadata matches
    search: SearchMode | None = None  # dense, sparse (BM25) or hybrid; None: the service's
    sampling: Sampling = GREEDY
    history: tuple[Turn, ...] = ()  # the conversation before the question (chat)
    # False: no passages, the conversation through the chat template as it is (or, with
    # template "raw", the question's text is the whole prompt: completions)
    retrieval: bool = True
    template: Template = "rag"
    # streaming (called on the event loop): the retrieved passages once they are known, and
    # the answer's text so far as it grows (EngineRequest.on_text)
    on_hits: Callable[[list[Hit]], None] | None = None
    on_text: Callable[[str], None] | None = None


@dataclass(frozen=True, slots=True)
class AskResult:
    answer: str
    adapter: str | None
    adapter_version: str | None
    mode: Mode
    hits: list[Hit]
    # how much each passage counted, summing to 1: the prior p(z|x) for concat, the
    # posterior p(z|x, y) for the marginalized modes
    weights: list[float]
    timings_ms: dict[str, float]
    generated_tokens: int = 0
    finish_reason: str = "length"  # "stop": an end token or a stop string ended the answer
    prompt_tokens: int = 0  # the tokens the generator read (every passage row's prompt)
    token_ids: tuple[int, ...] = ()  # the generated tokens, the end token included
    # the passages do not support an answer: `answer` says so (app/generation/abstain.py)
    abstained: bool = False
    # citation marks the check moved to the passage holding their claim (citations.py)
    citations_moved: int = 0


def prior_weights(scores: Sequence[float]) -> list[float]:
    """p(z|x): softmax over the retrieval scores (inner products), as in the RAG paper."""
    if not scores:
        return []
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def _checked(on_text: Callable[[str], None], check: CitationCheck) -> Callable[[str], None]:
    """on_text, handed the answer so far with its marks checked (a mark still being written
    waits for its end), so the streamed pieces join into the checked answer."""
    return lambda text: on_text(check(text, final=False).text)


def _plain(template: Template) -> Template:
    """A request without retrieval reads no passages: the conversation as it is, or raw text."""
    return "raw" if template == "raw" else "chat"


class RagService:
    def __init__(
        self,
        retriever: Retrieves,
        engine: Engine,
        registry: AdapterRegistry,
        *,
        request_timeout_s: float,
        tasks: TaskBundles | None = None,
        default_top_k: int = 5,
        default_mode: Mode = "concat",
        default_search: SearchMode = "dense",
        scorer: ScoresPrompts | None = None,
        abstain: AbstainConfig | None = None,
        prompts: PromptConfig | None = None,
        check_citations: bool = False,
    ) -> None:
        self.retriever = retriever
        # the generator's prompt layout: a concat answer lists its passages as its prompt
        # numbers them (`_listed`)
        self.prompts = prompts or PromptConfig()
        self.abstain = abstain or AbstainConfig(enabled=False)
        # a concat answer's "[n]" marks are checked against the passages (citations.py)
        self.check_citations = check_citations
        self.scorer = scorer  # the generator, for prompt log-probabilities (model thread)
        self.engine = engine
        self.registry = registry
        self._timeout_s = request_timeout_s
        # bundle parts beside the registry's generator adapters: request defaults, question
        # adapters (applied and used on the retrieval thread below)
        self.tasks = tasks or TaskBundles(registry.root, None)
        self._defaults: tuple[int, Mode] = (default_top_k, default_mode)
        self.default_search: SearchMode = default_search
        # One retrieval thread: the encoder's fast tokenizer is not safe to call from two
        # threads at once ("Already borrowed"), and on a CPU the encoder's own matmuls already
        # use every core. It runs beside the model thread, so retrieval and generation overlap.
        self._retrieval = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lorag-retrieval"
        )
        # questions that arrive while it encodes are encoded together next: one encoder call
        # for a burst of asks instead of a convoy of single ones (app/engine/coalesce.py)
        self._retrievals: Coalescer[RetrievalKey, str, list[Hit]] = Coalescer(
            self._retrieve_batch, self._retrieval
        )
        # lazy loads in flight, by adapter name: concurrent asks for one unloaded adapter share
        # one load (touched on the event loop only)
        self._loading: dict[str, asyncio.Future[AdapterInfo]] = {}
        self._background: set[asyncio.Future[None]] = set()  # tasks nobody awaits
        # where a lazy load finds a name's files; a fleet (app/fleet) puts its registrations here
        self.adapter_source: AdapterSource = _Folders()

    async def ask(self, params: AskParams) -> AskResult:
        if params.adapter is None:
            return await self._ask(params, None)
        # held from before the (lazy) load until the answer: eviction leaves it alone meanwhile
        with self.registry.hold(params.adapter):
            lease = await self._acquire(params.adapter)  # 404 before any work if it cannot
            try:
                return await self._ask(params, lease)
            finally:
                if self.registry.release(lease):  # the last request on a retired version
                    self._collect_soon()

    def _collect_soon(self) -> None:
        """Free retired adapter weights on the model thread, in queue order, without waiting."""

        async def collect() -> None:
            try:
                await self.engine.run_exclusive(self.registry.collect)
            except NotReadyError:  # stopping: the weights go with the process
                pass
            except Exception:
                log.exception("freeing retired adapter weights failed")

        task = asyncio.ensure_future(collect())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _acquire(self, name: str) -> Lease:
        """A lease on the version of `name` loaded now (loading it first, with lazy loading):
        the request runs on that version even if a swap or an unload comes before its batch."""
        for _ in range(3):  # unloaded again between its lazy load and here: load it once more
            if name not in self.registry:
                await self._lazy_load(name)
            try:
                return self.registry.acquire(name)
            except AdapterNotFound:
                if not self.registry.policy.lazy_load:
                    raise
        raise AdapterNotFound(name)

    async def _lazy_load(self, name: str) -> AdapterInfo:
        """Load adapters_dir/<name> as name, once however many asks wait for it."""
        if not self.registry.policy.lazy_load:
            raise AdapterNotFound(name)
        pending = self._loading.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._load_folder(name))
            self._loading[name] = pending
            pending.add_done_callback(
                lambda done: self._loading.pop(name) if self._loading.get(name) is done else None
            )
        return await asyncio.shield(pending)  # one caller giving up does not cancel the load

    async def _load_folder(self, name: str) -> AdapterInfo:
        for _ in range(3):  # the registration changed while its files were read: read again
            where = self.adapter_source.locate(name)
            rel, version = where
            try:
                load = await self.prepare_adapter(rel, expect_version=version)
            except AdapterPathNotFound:
                raise AdapterNotFound(name) from None

            def install(
                load: PreparedLoad = load, where: tuple[str, str | None] = where
            ) -> AdapterInfo | None:
                # checked on the model thread, where a fleet's own installs run in order, so
                # this never installs a folder that a newer registration replaced
                if self.adapter_source.locate(name) != where:
                    return None
                return self.registry.ensure(name, load.adapter)

            info = await self.engine.run_exclusive(install)
            if info is None:
                continue
            if info.path == rel and info.version == load.version:  # this folder is what serves
                await self._apply_task(name, load.task)
            return info
        raise AdapterNotFound(name)

    async def _ask(self, params: AskParams, lease: Lease | None) -> AskResult:
        t0 = time.perf_counter()
        if not params.question.strip():
            raise InvalidInputError("question is empty")
        task = self.tasks.manifest(params.adapter)
        top_k = params.top_k or (task.top_k if task else None) or self._defaults[0]
        mode: Mode = params.mode or (task.mode if task else None) or self._defaults[1]
        if not params.retrieval and mode != "concat":
            raise InvalidInputError(f"mode {mode!r} marginalizes over passages: it needs retrieval")
        # announced now, so a batch forming meanwhile waits for this row (app/engine/engine.py)
        with self.engine.expect() as expected:
            # a bundle with a question-encoder part encodes its own questions: its own group
            asker = params.adapter if task is not None else None
            hits: list[Hit] = []
            search = params.search or self.default_search
            if params.retrieval:
                key = (top_k, params.index, asker, params.where, search)
                hits = await self._retrievals.submit(key, params.question)
            t1 = time.perf_counter()
            listed = self._listed(mode, hits)
            if params.on_hits is not None:
                params.on_hits(listed)
            grounded = params.retrieval and params.template == "rag"
            # the retrieval gate's threshold is a cosine: dense's scores, hybrid's dense half
            # (Hit.dense_best); sparse (BM25) has none, only the generator's refusal counts
            cosines = gate_cosines(search, hits) if grounded else None
            if cosines is not None and unsupported(self.abstain, cosines):
                return self._abstained(params, lease, mode, listed, t0, t1)
            # only a concat prompt numbers its passages [1], [2], ... (prompts.py)
            check = None
            if grounded and mode == "concat" and self.check_citations:
                check = CitationCheck(
                    [(h.passage.title, h.passage.text) for h in listed], [h.score for h in listed]
                )
                if params.on_text is not None:  # streamed: checked as the answer grows
                    params = dataclasses.replace(params, on_text=_checked(params.on_text, check))
            result = await self._generate(params, lease, mode, hits, listed, expected, t0, t1)
            if grounded and (
                refuses(self.abstain, result.answer)
                or ungrounded(self.abstain, result.answer, [h.passage for h in hits])
            ):
                return dataclasses.replace(result, answer=ABSTAIN_TEXT, abstained=True)
            if check is not None:
                checked = check(result.answer)
                result = dataclasses.replace(
                    result, answer=checked.text, citations_moved=checked.moved
                )
            return result

    def _listed(self, mode: Mode, hits: list[Hit]) -> list[Hit]:
        """The hits (in retrieval order) as the answer lists them: a concat prompt's in the
        order the prompt numbers them (app/generation/prompts.py), so that a citation [n] names
        the n-th; the RAG modes' (a prompt per passage) in retrieval order."""
        if mode != "concat":
            return hits
        return prompt_order(hits, [h.passage for h in hits], self.prompts.concat_order)

    def _abstained(
        self,
        params: AskParams,
        lease: Lease | None,
        mode: Mode,
        hits: list[Hit],
        t0: float,
        t1: float,
    ) -> AskResult:
        """No passage scores high enough to hold an answer: say so, without generating."""
        if params.on_text is not None:
            params.on_text(ABSTAIN_TEXT)
        return AskResult(
            answer=ABSTAIN_TEXT,
            adapter=params.adapter,
            adapter_version=lease.version if lease is not None else None,
            mode=mode,
            hits=hits,
            weights=prior_weights([h.score for h in hits]),
            timings_ms={
                "retrieve": (t1 - t0) * 1000,
                "generate": 0.0,
                "total": (time.perf_counter() - t0) * 1000,
                "reused_prompt_tokens": 0,
            },
            finish_reason="stop",
            abstained=True,
        )

    async def _generate(
        self,
        params: AskParams,
        lease: Lease | None,
        mode: Mode,
        hits: list[Hit],
        listed: list[Hit],
        expected: Expected,
        t0: float,
        t1: float,
    ) -> AskResult:
        """Generate from hits (retrieval order, as the engine reads them); the result lists
        them as `listed` (`_listed`)."""
        request = EngineRequest(
            question=params.question,
            passages=[h.passage for h in hits],
            adapter=params.adapter,
            max_new_tokens=params.max_new_tokens,
            mode=mode,
            decoding=params.decoding,
            scores=[h.score for h in hits],
            lease=lease,
            sampling=params.sampling,
            history=params.history,
            template=params.template if params.retrieval else _plain(params.template),
            on_text=params.on_text,
        )
        result = await self.engine.generate(request, timeout_s=self._timeout_s, expected=expected)
        t2 = time.perf_counter()
        text = result.answer.text
        return AskResult(
            # a completion continues the caller's text: its leading space is part of it
            answer=text if params.template == "raw" else text.strip(),
            adapter=params.adapter,
            adapter_version=result.adapter_version,
            mode=mode,
            hits=listed,
            weights=(
                result.answer.weights
                if result.answer.weights is not None
                else prior_weights([h.score for h in listed])
            ),
            timings_ms={
                "retrieve": (t1 - t0) * 1000,
                "generate": (t2 - t1) * 1000,
                "total": (t2 - t0) * 1000,
                "reused_prompt_tokens": result.answer.reused_tokens,
            },
            generated_tokens=result.answer.tokens,
            finish_reason=result.answer.finish_reason,
            prompt_tokens=result.answer.prompt_tokens,
            token_ids=result.answer.ids,
        )

    async def prompt_logprobs(
        self, adapter: str | None, text: str, top: int = 0
    ) -> tuple[str | None, list[tuple[int, float | None, list[tuple[int, float]]]]]:
        """Each token of text with its log-probability under adapter (None: the base), and the
        `top` likeliest at its position: one forward pass on the model thread, in queue order
        (the score of a prompt, as lm-eval's loglikelihood tasks ask /v1/completions for it).
        Returns the adapter version it ran on, and the tokens."""
        if not text:
            raise InvalidInputError("the prompt is empty")
        scorer = self.scorer
        if scorer is None:
            raise NotReadyError("this service was built without a prompt scorer")
        if adapter is None:
            fn = self.engine.run_exclusive
            return None, await fn(lambda: scorer.prompt_logprobs(text, None, top))
        with self.registry.hold(adapter):
            lease = await self._acquire(adapter)
            try:

                def score() -> list[tuple[int, float | None, list[tuple[int, float]]]]:
                    name = self.registry.peft_name_of(lease)  # now, on the model thread
                    return scorer.prompt_logprobs(text, name, top)

                return lease.version, await self.engine.run_exclusive(score)
            finally:
                if self.registry.release(lease):
                    self._collect_soon()

    def _retrieve_batch(self, key: RetrievalKey, questions: Sequence[str]) -> list[list[Hit]]:
        """On the retrieval thread, for the questions that arrived together with one key. An
        adapter with a question-encoder part encodes them itself (per call: no adapter switch
        is shared between requests), then searches the same index; every other request goes
        through the server's encoder."""
        k, index, adapter, where, mode = key
        # a question adapter moves the dense half (sparse reads only the words)
        vectors = None
        if mode != "sparse":
            vectors = self.tasks.question_vectors(list(questions), adapter)  # [n, dim] or None
        if vectors is None:
            return self.retriever.retrieve(questions, k, index=index, where=where, mode=mode)
        target = self.retriever.resolve(index)
        return target.search(vectors, k, where, mode=mode, texts=list(questions))

    async def _apply_task(self, name: str, task: PreparedTask) -> None:
        # on the retrieval thread, so a question adapter never changes under an encode
        await asyncio.get_running_loop().run_in_executor(
            self._retrieval, self.tasks.apply, name, task
        )

    # adapters: validation off the model thread, the swap on it, in queue order ----------------

    def close(self) -> None:
        self._retrieval.shutdown(wait=True)

    async def in_retrieval_thread(self, fn: Callable[[], T]) -> T:
        """Run fn on the retrieval thread, where the encoder may run (document updates)."""
        return await asyncio.get_running_loop().run_in_executor(self._retrieval, fn)

    async def prepare_adapter(
        self, rel_path: str, *, expect_version: str | None = None
    ) -> PreparedLoad:
        """Read and validate the folder at rel_path (off the model thread); with expect_version,
        refuse files whose content hash differs (AdapterStale): a replica never serves another
        copy under a name that the fleet registered with this version."""
        prepared = await asyncio.to_thread(self.registry.prepare, rel_path)
        if expect_version is not None and prepared.version != expect_version:
            raise AdapterStale(rel_path, expect_version, prepared.version)
        task = await asyncio.to_thread(self.tasks.prepare, rel_path)  # a bundle: validated too
        return PreparedLoad(prepared, task)

    async def install_adapter(
        self, name: str, load: PreparedLoad, *, pinned: bool = False
    ) -> tuple[AdapterInfo, bool]:
        """Install a prepared adapter as name, on the model thread in queue order."""
        loaded = await self.engine.run_exclusive(
            lambda: self.registry.install(name, load.adapter, pinned=pinned)
        )
        await self._apply_task(name, load.task)
        return loaded

    async def load_adapter(
        self, name: str, rel_path: str, *, pinned: bool = False
    ) -> tuple[AdapterInfo, bool]:
        return await self.install_adapter(name, await self.prepare_adapter(rel_path), pinned=pinned)

    async def unload_adapter(self, name: str) -> None:
        self.registry.get(name)  # 404 before queueing
        await self.engine.run_exclusive(lambda: self.registry.unload(name))
        await asyncio.get_running_loop().run_in_executor(self._retrieval, self.tasks.remove, name)
