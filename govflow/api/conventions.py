"""What the route modules share: query limits and filters, documented errors, body decoding.

The handlers decode their bodies themselves (to answer 400, 413 and 422 exactly, never
500); ``decode`` is how, for every body but an event's.
"""

from __future__ import annotations

import uuid
from typing import Annotated, TypeVar

import msgspec
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import QueryParameter

from govflow.api.errors import invalid

T = TypeVar("T")

MAX_PAGE = 500
MAX_OFFSET = 1_000_000
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]

# Filters go to text columns: bounded, and without the NUL Postgres text cannot hold.
Filter = Annotated[str | None, QueryParameter(max_length=512, pattern=r"^[^\x00]*$")]

AUTH_ERRORS = {
    401: ResponseSpec(None, description="No bearer token, or not a configured one"),
    403: ResponseSpec(None, description="The token lacks the scope (or no tokens are set)"),
}
UNAVAILABLE_ERRORS = {503: ResponseSpec(None, description="Redis or Postgres is unavailable")}


def decode(body: bytes, decoder: msgspec.json.Decoder[T], what: str) -> T:
    """A request body decoded: 400 when it is not JSON, 422 naming the field that is wrong."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise invalid(what, str(e)) from e
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise HTTPException(status_code=400, detail=f"the body is not valid JSON: {e}") from e


def execution_key(execution_id: str) -> str:
    """``execution_id`` as the UUID it must be.

    Raises:
        NotFoundException: not a UUID, so no execution has it.
    """
    try:
        return str(uuid.UUID(execution_id))
    except ValueError as e:
        raise NotFoundException(f"no execution {execution_id!r}: ids are UUIDs") from e
