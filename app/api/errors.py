"""Domain errors → HTTP status codes, in one place. Every body is {"detail": "<message>"},
except on the OpenAI-compatible routes (/v1), where it is OpenAI's
{"error": {"message", "type", "param", "code"}} and an invalid request is a 400, as OpenAI's
clients expect (the official SDK picks its exception class by the status code)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.disconnect import CLIENT_CLOSED, ClientDisconnected
from app.errors import (
    AdapterNotFound,
    AdapterStale,
    GenerationTimeout,
    IndexNotFound,
    InvalidInputError,
    LoragError,
    NotFoundError,
    NotReadyError,
)

V1 = "/v1"  # the OpenAI-compatible routes' prefix (app/api/openai.py)

STATUS: list[tuple[type[LoragError], int]] = [
    (NotFoundError, 404),
    (AdapterStale, 409),
    (InvalidInputError, 422),
    (NotReadyError, 503),
    (GenerationTimeout, 504),
]


def status_for(exc: LoragError) -> int:
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return 500


class OpenAIError(Exception):
    """A /v1 request refused in OpenAI's terms: the status, a message naming the bad value,
    the request field it concerns (`param`) and a machine-readable `code`."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def is_v1(request: Request) -> bool:
    path = request.url.path
    return path == V1 or path.startswith(V1 + "/")


def openai_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def openai_error(exc: LoragError) -> OpenAIError:
    """A domain error as /v1 reports it: an unknown adapter is OpenAI's unknown model."""
    if isinstance(exc, AdapterNotFound):
        return OpenAIError(
            404,
            f"the model {exc.name!r} does not exist: GET /v1/models lists the base model and "
            "the loaded adapters",
            param="model",
            code="model_not_found",
        )
    status = status_for(exc)
    if status == 422:  # OpenAI's clients expect a bad request to be a 400
        status = 400
    code = {404: "not_found", 503: "service_unavailable", 504: "timeout"}.get(status)
    param = "index" if isinstance(exc, IndexNotFound) else None
    return OpenAIError(status, str(exc), param=param, code=code)


def _openai_response(exc: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    body = openai_body(exc.status, str(exc), param=exc.param, code=exc.code)
    return JSONResponse(body, status_code=exc.status, headers=headers)


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
    async def _lorag(request: Request, exc: LoragError) -> JSONResponse:
        headers = {"Retry-After": "1"} if isinstance(exc, NotReadyError) else None
        if is_v1(request):
            return _openai_response(openai_error(exc), headers)
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc), headers=headers)

    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return _openai_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI turns a body it cannot decode (not UTF-8) into a bare 400 "error parsing the
        # body"; say what is wrong, with the 422 every other malformed body gets
        if isinstance(exc.__cause__, UnicodeDecodeError):
            message = f"malformed JSON body: not valid UTF-8 at byte {exc.__cause__.start}"
            if is_v1(request):
                return _openai_response(OpenAIError(400, message))
            return JSONResponse({"detail": message}, status_code=422)
        if is_v1(request):
            code = "invalid_api_key" if exc.status_code == 401 else None
            error = OpenAIError(exc.status_code, str(exc.detail), code=code)
            return _openai_response(error, dict(exc.headers or {}))
        return await http_exception_handler(request, exc)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
        # nobody reads it; the request log and metrics record the status
        return JSONResponse({"detail": "client closed request"}, status_code=CLIENT_CLOSED)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if is_v1(request):
            error = OpenAIError(400, describe_validation(exc), param=_first_field(exc))
            return _openai_response(error)
        return JSONResponse({"detail": describe_validation(exc)}, status_code=422)


def _first_field(exc: RequestValidationError) -> str | None:
    """The request field the first problem is in, as OpenAI's `param` names it ("messages")."""
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if loc and err.get("type") != "json_invalid":
            return loc[0]
    return None
