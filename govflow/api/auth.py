"""Who may call the HTTP API: bearer tokens with scopes, from ``GOVFLOW_API_TOKENS``.

A request names its token in ``Authorization: Bearer <token>``. The token is compared
with every configured token, each with ``hmac.compare_digest`` and without stopping at
a match, so the time taken says nothing about which token, or how much of one, matched.

Answers:

- no token, a malformed header or an unknown token: 401 with ``WWW-Authenticate: Bearer``;
- a known token without the scope: 403 (``error="insufficient_scope"``);
- no tokens configured at all: writes (``publish``, ``operate``, ``decide``) are refused
  with 403 (README.md, "The HTTP API and the dashboard"); reads are open to loopback
  clients only, so ``govflow serve`` on a laptop shows its dashboard with nothing to set up, and
  any other client gets 403. A read that takes ``operate`` with tokens (the dead
  letters, which hold payloads) says so with ``opt["loopback_reads"]``: loopback clients
  may make it too.

``GET /token`` tells a caller its own scopes (the dashboard shows a button only to a token
that may use it). A token never reaches a log line or a response. The actor a replay is
recorded under is ``api:`` and the first 8 hex digits of the token's SHA-256: an operator
can tell which token did it (``printf %s "$TOKEN" | sha256sum``) and the record does not
hold the token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any, Literal

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

Scope = Literal["publish", "read", "operate", "decide"]

# The key a guard leaves the caller under, in the request's state.
PRINCIPAL = "govflow_principal"


class Principal(msgspec.Struct, frozen=True):
    """Who made a request: the actor recorded for what they do, and their scopes."""

    actor: str
    scopes: frozenset[str]


LOOPBACK = Principal("local", frozenset({"read"}))
NOBODY = Principal("anonymous", frozenset())


class TokenAuth:
    """Check bearer tokens against the configured ones.

    Args:
        tokens: each token and its scopes (``Settings.tokens()``); empty: no tokens.
    """

    def __init__(self, tokens: dict[str, frozenset[str]]) -> None:
        self._tokens = [(token.encode(), scopes) for token, scopes in tokens.items()]

    @property
    def configured(self) -> bool:
        """Whether any token is configured."""
        return bool(self._tokens)

    def identify(self, connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
        """The caller of ``connection`` and every scope it holds.

        Without configured tokens a loopback client may read and anyone else nothing.

        Raises:
            NotAuthorizedException: no token, or not a configured one (401).
        """
        if not self._tokens:
            return LOOPBACK if _is_loopback(connection) else NOBODY
        presented = _bearer(connection.headers.get("authorization"))
        if presented is None:
            raise NotAuthorizedException(
                "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        found = self._match(presented)
        if found is None:
            raise NotAuthorizedException(
                "the bearer token is not valid",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return Principal(f"api:{hashlib.sha256(presented).hexdigest()[:8]}", found)

    def principal(
        self,
        connection: ASGIConnection[Any, Any, Any, Any],
        scope: Scope,
        *,
        loopback_reads: bool = False,
    ) -> Principal:
        """The caller of ``connection`` if it may use ``scope``.

        ``loopback_reads``: the route only reads, so without tokens a loopback client may
        call it whatever its scope.

        Raises:
            NotAuthorizedException: no token, or not a configured one (401).
            PermissionDeniedException: not allowed to use ``scope`` (403).
        """
        caller = self.identify(connection)
        if scope in caller.scopes or (loopback_reads and caller is LOOPBACK):
            return caller
        if not self._tokens and (scope == "read" or loopback_reads):
            raise PermissionDeniedException(
                "GOVFLOW_API_TOKENS is not set: reads are open to loopback clients only"
            )
        if not self._tokens:
            raise PermissionDeniedException(
                "GOVFLOW_API_TOKENS is not set: the API takes no writes without tokens"
            )
        raise PermissionDeniedException(
            f"this token lacks the {scope!r} scope",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope" scope="{scope}"'},
        )

    def _match(self, presented: bytes) -> frozenset[str] | None:
        """The scopes of the configured token equal to ``presented``, in constant time."""
        found: frozenset[str] | None = None
        for token, scopes in self._tokens:
            # No early exit: every token is compared, whatever matched before.
            if hmac.compare_digest(presented, token):
                found = scopes
        return found


def scope_guard(auth: TokenAuth) -> Any:
    """A Litestar guard for the whole app: a handler's ``opt["scope"]`` names what it needs.

    A handler without a scope is open to everyone. The caller let through is left in the
    request's state for ``principal_of``.
    """

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        scope = handler.opt.get("scope")
        if scope is not None:
            loopback_reads = bool(handler.opt.get("loopback_reads"))
            connection.state[PRINCIPAL] = auth.principal(
                connection, scope, loopback_reads=loopback_reads
            )

    return guard


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The caller a guard let through."""
    found: Principal = connection.state[PRINCIPAL]
    return found


def _bearer(header: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if header is None:
        return None
    kind, _, token = header.strip().partition(" ")
    token = token.strip()
    if kind.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", errors="surrogateescape")


def _is_loopback(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    client = connection.client
    if client is None:
        return False
    try:
        return ipaddress.ip_address(client.host).is_loopback
    except ValueError:
        return False
