"""`lorag serve | prepare | index build | adapter list/load/unload/train | ask`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.contracts import SEARCH_MODES
from app.errors import InvalidInputError, LoragError
from app.logs import configure_logging
from app.retrieval.cli import IndexCommandConfig, add_index_parsers
from app.settings import Settings
from app.training.cli import add_train_parser

if TYPE_CHECKING:
    from app.service import AskParams, AskResult
    from app.training.config import TrainingConfig

log = logging.getLogger("lorag")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for key in ("host", "port", "index_name", "store"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from app.server import serve

    failure = serve(_settings(args))
    if failure is not None:
        print(f"lorag: refusing to serve: {failure}", file=sys.stderr)
        return 1
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from app.wiring import prepare

    prepare(_settings(args))
    return 0


def _index_config() -> IndexCommandConfig:
    from functools import partial

    from app.wiring import opened_store

    settings = Settings()
    return IndexCommandConfig(
        partial(opened_store, settings),
        settings.encoder_spec,
        settings.max_document_chars,
        settings.compaction,
    )


def training_config(settings: Settings) -> TrainingConfig:
    """What `lorag adapter train` reads: this service's index, encoder and roots. Built here,
    not as a Settings property, because serving must not import app.training (pyproject)."""
    from functools import partial

    from app.training.config import TrainingConfig
    from app.wiring import opened_store

    return TrainingConfig(
        adapters_dir=settings.adapters_dir,
        cache_dir=settings.cache_dir,
        store=partial(opened_store, settings),
        encoder=settings.encoder_spec,
        base=settings.generator,
        top_k=settings.top_k,
        answer_reserve=settings.max_new_tokens,  # /ask's default answer budget
    )


def cmd_index_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from app.retrieval.builder import build_index, build_passage_index

    settings = _settings(args)
    if settings.store != "faiss" and args.index_type is not None:
        raise InvalidInputError(
            f"--type is a FAISS index kind; the {settings.store} store has its own"
        )
    encoder = settings.encoder_spec.load(passage_autocast="bfloat16" if args.bf16 else None)
    sources = [Path(s) for s in args.sources]
    if settings.store != "faiss":
        from app.retrieval.ann import AnnSpec
        from app.retrieval.index_copy import fill
        from app.wiring import opened_store

        # embedded in memory (flat: the vectors stay as they are), then upserted into the store
        index = build_passage_index(sources, encoder, words=args.words, spec=AnnSpec("flat"))
        with opened_store(settings, encoder.fingerprint) as store:
            documents, passages = fill(store, settings.index_name, index)
        print(
            f"built {settings.store} index {settings.index_name!r}: {documents} documents "
            f"({passages} passages), encoder {encoder.fingerprint}"
        )
        return 0
    out = settings.index_path
    spec = settings.search
    if args.index_type is not None:
        spec = replace(spec, kind=args.index_type)
    manifest = build_index(sources, encoder, out, words=args.words, spec=spec)
    print(
        f"built {out}: {manifest.passage_count} passages, {manifest.index_type}, "
        f"encoder {manifest.encoder}"
    )
    return 0


def _http(method: str, url: str, body: dict[str, Any] | None, token: str | None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        raise SystemExit(f"lorag: {method} {url} -> {err.code}: {detail}") from None
    return json.loads(raw) if raw else None


def cmd_adapter(args: argparse.Namespace) -> int:
    admin_token = Settings().security.admin_token
    token = admin_token.get_secret_value() if admin_token else None
    base = args.url.rstrip("/")
    if args.action == "list":
        result = _http("GET", f"{base}/adapters", None, None)
    elif args.action == "load":
        result = _http("PUT", f"{base}/adapters/{args.name}", {"path": args.path}, token)
    else:
        result = _http("DELETE", f"{base}/adapters/{args.name}", None, token)
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    if args.url:
        body: dict[str, Any] = {"question": args.question}
        for key in ("adapter", "top_k", "max_new_tokens", "retrieval"):
            if getattr(args, key):
                body[key] = getattr(args, key)
        result = _http("POST", f"{args.url.rstrip('/')}/ask", body, None)
    else:
        from app.service import AskParams

        settings = _settings(args)
        params = AskParams(
            question=args.question,
            adapter=args.adapter,
            top_k=args.top_k,  # None: the adapter's task default, else LORAG_TOP_K
            max_new_tokens=args.max_new_tokens or settings.max_new_tokens,
            search=args.retrieval,  # None: LORAG_RETRIEVAL
        )
        result = _answer(asyncio.run(_ask_in_process(settings, params)))
    print(json.dumps(result, indent=2))
    return 0


async def _ask_in_process(settings: Settings, params: AskParams) -> AskResult:
    """Answer without a server: the service built by app/wiring.py, its engine on this loop."""
    from app.wiring import running_service

    async with running_service(settings) as service:
        return await service.ask(params)


def _answer(result: AskResult) -> dict[str, Any]:
    """The answer as POST /ask's JSON body gives it (without the request id)."""
    return {
        "answer": result.answer,
        "adapter": result.adapter,
        "adapter_version": result.adapter_version,
        "mode": result.mode,
        "passages": [
            {
                "id": h.passage.id,
                "doc_id": h.passage.doc_id,
                "title": h.passage.title,
                "text": h.passage.text,
                "score": h.score,
                "weight": w,
            }
            for h, w in zip(result.hits, result.weights, strict=True)
        ],
        "timings_ms": result.timings_ms,
        "generated_tokens": result.generated_tokens,
        "finish_reason": result.finish_reason,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorag", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the HTTP API (settings from LORAG_* env vars)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--index-name", dest="index_name")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("prepare", help="convert the default generator, build the demo index")
    s.set_defaults(func=cmd_prepare)

    idx = sub.add_parser("index", help="build indexes").add_subparsers(dest="action", required=True)
    s = idx.add_parser("build", help="build an index from .jsonl/.txt/.md files or folders")
    s.add_argument("sources", nargs="+")
    s.add_argument("--name", dest="index_name", default="demo", help="index name")
    s.add_argument("--words", type=int, default=100, help="words per passage")
    s.add_argument(
        "--store",
        choices=["faiss", "postgres"],
        help="where the index goes (default: LORAG_STORE): a folder under LORAG_INDEX_DIR, or "
        "a collection in LORAG_DATABASE_URL",
    )
    s.add_argument(
        "--type",
        dest="index_type",
        choices=["auto", "flat", "hnsw", "ivf_pq", "ivf_sq"],
        help="FAISS index kind (default: LORAG_INDEX_TYPE, auto: by passage count)",
    )
    s.add_argument(
        "--bf16",
        action="store_true",
        help="embed passages under bfloat16 autocast: 2-3x faster on CPUs with AMX/AVX-512 BF16, "
        "vectors within cosine 0.99998 of float32 (bench/RESULTS.md)",
    )
    s.set_defaults(func=cmd_index_build)
    add_index_parsers(
        idx, _index_config
    )  # add, delete, compact: live changes through the update log

    ad = sub.add_parser("adapter", help="manage adapters on a running server")
    ad.add_argument("--url", default="http://127.0.0.1:8000")
    acts = ad.add_subparsers(dest="action", required=True)
    acts.add_parser("list").set_defaults(func=cmd_adapter)
    s = acts.add_parser("load", help="load or replace NAME from PATH under the adapters root")
    s.add_argument("name")
    s.add_argument("path")
    s.set_defaults(func=cmd_adapter)
    s = acts.add_parser("unload")
    s.add_argument("name")
    s.set_defaults(func=cmd_adapter)
    add_train_parser(
        acts, lambda: training_config(Settings())
    )  # local: writes adapters/NAME, needs no server

    s = sub.add_parser("ask", help="ask a question (in process, or --url a server)")
    s.add_argument("question")
    s.add_argument("--adapter")
    s.add_argument("--top-k", dest="top_k", type=int)
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    s.add_argument(
        "--retrieval",
        choices=SEARCH_MODES,
        help="dense, sparse (BM25) or hybrid; default: LORAG_RETRIEVAL",
    )
    s.add_argument("--url")
    s.add_argument("--index-name", dest="index_name")
    s.set_defaults(func=cmd_ask)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    configure_logging("debug" if args.verbose else settings.log_level, json_lines=settings.log_json)
    try:
        code: int = args.func(args)
    except LoragError as exc:  # a bad input, named by the error: no traceback
        print(f"lorag: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
