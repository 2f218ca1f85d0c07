"""Domain errors → HTTP status codes, in one place. Every body is {"detail": "<message>"}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.disconnect import CLIENT_CLOSED, ClientDisconnected
from app.errors import (
    GenerationTimeout,
    InvalidInputError,
    LoragError,
    NotFoundError,
    NotReadyError,
)

STATUS: list[tuple[type[LoragError], int]] = [
    (NotFoundError, 404),
    (InvalidInputError, 422),
    (NotReadyError, 503),
    (GenerationTimeout, 504),
]


def status_for(exc: LoragError) -> int:
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def describe_validation(exc: RequestValidationError) -> str:
    """One line per problem: where, what, and the value that was sent."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            parts.append(f"malformed JSON body{': ' + ctx if ctx else ''}")
            continue
        given = err.get("input")
        shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
        if len(shown) > 80:
            shown = shown[:77] + "..."
        parts.append(f"{loc}: {msg} (got {shown})" if "input" in err else f"{loc}: {msg}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoragError)
    async def _lorag(_: Request, exc: LoragError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, NotReadyError) else None
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc), headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI turns a body it cannot decode (not UTF-8) into a bare 400 "error parsing the
        # body"; say what is wrong, with the 422 every other malformed body gets
        if isinstance(exc.__cause__, UnicodeDecodeError):
            cause = exc.__cause__
            return JSONResponse(
                {"detail": f"malformed JSON body: not valid UTF-8 at byte {cause.start}"},
                status_code=422,
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
        # nobody reads it; the request log and metrics record the status
        return JSONResponse({"detail": "client closed request"}, status_code=CLIENT_CLOSED)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": describe_validation(exc)}, status_code=422)
