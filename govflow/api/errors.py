"""How the HTTP API answers errors: Litestar's JSON shape, ``{"status_code", "detail",
"extra"?}``, for every one. A server that is down is a 503 naming it; an invalid body is a
422 naming the field; anything unexpected is a 500 that says nothing more, logged here
with the method and path (never a header, so never a token)."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException
from psycopg_pool import PoolTimeout

from govflow.core.unavailable import is_unavailable
from govflow.runtime.log import redact_url

log = structlog.get_logger(__name__)

_MISSING = re.compile(r"missing required field `([^`]+)`")


def invalid(what: str, message: str) -> HTTPException:
    """A 422 that names the field msgspec's message points at (``... - at `$.type```)."""
    text, _, path = message.partition(" - at `$")
    key = path.rstrip("`").removeprefix(".")
    if missing := _MISSING.search(text):  # msgspec names a missing field in the message
        key = f"{key}.{missing[1]}" if key else missing[1]
    item: dict[str, str] = {"message": text, "source": "body"}
    if key:
        item["key"] = key
    return HTTPException(status_code=422, detail=f"{what}: {message}", extra=[item])


def error_response(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """Litestar's error shape for every error; outages are 503, anything unexpected 500."""
    if isinstance(error, HTTPException):
        status, detail, headers = error.status_code, error.detail, error.headers
        extra = error.extra
    elif isinstance(error, psycopg.errors.UndefinedTable):
        status, detail, headers, extra = (
            503,
            "the database has no govflow tables yet: run `govflow migrate`",
            None,
            None,
        )
    elif is_unavailable(error):
        server = "Postgres" if isinstance(error, PoolTimeout | psycopg.Error) else "Redis"
        status, detail, headers, extra = 503, f"{server} is unavailable", {"Retry-After": "5"}, None
    else:
        log.error(
            "api.error",
            method=request.method,
            path=request.url.path,
            error=f"{type(error).__name__}: {error}",
            exc_info=error,
        )
        status, detail, headers, extra = 500, "Internal Server Error", None, None
    if status >= 500 and status != 503:
        detail = "Internal Server Error"
    content: dict[str, Any] = {"status_code": status, "detail": detail}
    if extra:
        content["extra"] = extra
    if status == 503:
        log.warning("api.unavailable", path=request.url.path, detail=detail, error=short(error))
    return Response(content, status_code=status, headers=headers, media_type=MediaType.JSON)


def short(error: BaseException) -> str:
    """One line about an error, with the password of any URL it quotes masked."""
    text = " ".join(redact_url(str(error)).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:199] + "…"
