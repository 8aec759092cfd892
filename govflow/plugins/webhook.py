"""Webhook delivery for the ``notify`` action: signed, idempotent, at least once.

A receiver is not trusted to behave: the connection gets ``min(timeout, 5)`` seconds,
each read ``timeout`` seconds, and the whole delivery, redirects included, the sum of the
two, so an answer dripped a byte at a time cannot hold a worker for long. Of the body
no more than 64 KiB is read: the status says everything, and a receiver that streams an
endless body has still answered. Redirects stay on the same origin (scheme, host and
port), within the operator's allow-list; every connection goes to an address the
egress policy allows (``plugins.egress``).

Every delivery is signed: ``X-Govflow-Signature: sha256=<hex HMAC-SHA256 of the body>``,
one signature per signing key, comma-separated, the newest key's first (two while a
rotated key is still valid). 408, 425, 429 and 5xx answers are retried, after the
receiver's ``Retry-After`` when it sends one; any other 4xx is permanent. With the
``otel`` extra, each request is a client span and sends its W3C ``traceparent`` header
(``core.tracing``).

Webhooks go out through aiohttp, not the httpx client plug-ins get (``StepContext.http``):
its HTTP parser is compiled, and a delivery costs a worker about an eighth of the CPU it
cost through httpx and httpcore, whose pure-Python HTTP/1.1 and pool were most of a
worker's time when every event sent a webhook (benchmarks/README.md, "Round six").
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import aiohttp
import anyio
import httpx

from govflow.core import metrics, tracing
from govflow.plugins.egress import EgressPolicy, PinnedResolver
from govflow.schemas.errors import PermanentError, RetryLater

SIGNATURE_HEADER = "X-Govflow-Signature"
MAX_REDIRECTS = 3
MAX_BODY_READ = 64 * 1024
# Answers that another try may get past: a time-out, "too early", "too many requests".
RETRIED_4XX = frozenset({408, 425, 429})
# Answers followed to their Location (within the origin); any other 3xx is retried.
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class WebhookRetryError(RuntimeError):
    """The receiver answered with a status worth another try (408, 425, 429, 5xx, 3xx)."""


class WebhookTimeoutError(TimeoutError):
    """The receiver did not take the connection, or did not answer, in time (retried)."""


class WebhookUnreachableError(ConnectionError):
    """No connection to the receiver, or it broke before the answer (retried)."""


def sign(secret: str, body: bytes) -> str:
    """One signature: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature(keys: Sequence[str], body: bytes) -> str:
    """The signature header's value: one signature per key, comma-separated, in order."""
    return ",".join(sign(key, body) for key in keys if key)


# A URL the check passed is remembered: the answer depends on nothing else, and reading a
# URL through httpx and the allow-list through ``ipaddress`` was 5 % of a worker's CPU when
# every event sent a webhook. A refusal is not remembered (an exception is not cached).
@functools.lru_cache(maxsize=4096)
def check_host(url: str, allowed: frozenset[str]) -> None:
    """Refuse a URL that is not http(s), cannot be read, or whose host the operator did
    not allow.

    Raises:
        PermanentError: the URL can never be delivered to.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - read for the error: a port out of range, or not a number
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        # The reason names the part at fault, never the URL: it may carry a password.
        raise PermanentError(f"webhook URL cannot be read: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Scheme and host only: the URL may carry a password.
        raise PermanentError(
            f"webhook URL ({parts.scheme or 'no scheme'}://{parts.hostname or ''}) is not http(s)"
        )
    EgressPolicy(allowed).check_host(parts.hostname)


async def deliver(
    client: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    idempotency_key: str,
    keys: Sequence[str],
    allowed: frozenset[str],
) -> int:
    """POST ``body``, signed with each of ``keys``, and return the status code.

    Redirects are followed only within the same origin, and the whole delivery gets the
    client's connect and read time-outs together, in all.

    Raises:
        PermanentError: a 4xx other than 408, 425 and 429, a redirect elsewhere, a refused
            URL, or no signing key.
        RetryLater: a retried status with a ``Retry-After`` the receiver asked for.
        WebhookRetryError: a retried status without one.
        WebhookTimeoutError: no connection or no answer in time (retried).
        WebhookUnreachableError: no connection, or a broken one (retried).
    """
    if not any(keys):  # a signature under an empty key would prove nothing
        raise PermanentError("no webhook signing key: run `govflow migrate`")
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": idempotency_key,
        SIGNATURE_HEADER: signature(keys, body),
    }
    # A connection, then an answer: each may take its own time-out, the two no more.
    total = (client.timeout.sock_connect or 0.0) + (client.timeout.sock_read or 0.0) or None
    with metrics.observe_webhook() as request:
        with anyio.move_on_after(total) as deadline:
            try:
                status, retry_after = await _post(client, url, body, headers, allowed)
            except aiohttp.InvalidURL as e:
                raise PermanentError(f"webhook URL cannot be read: {_what(e)}") from None
            except aiohttp.ServerTimeoutError as e:  # connecting, or one read, took too long
                raise WebhookTimeoutError(f"webhook timed out ({_what(e)})") from None
            except aiohttp.ClientError as e:
                raise WebhookUnreachableError(f"webhook unreachable ({_what(e)})") from None
        if deadline.cancelled_caught:
            raise WebhookTimeoutError(f"webhook timed out (longer than {total:g} s in all)")
        request.status = status
    if status < 300:
        return status
    if 400 <= status < 500 and status not in RETRIED_4XX:
        raise PermanentError(f"webhook answered {status}")
    delay = retry_after_seconds(retry_after)
    if delay is not None and status >= 400:
        raise RetryLater(delay, f"webhook answered {status}, Retry-After {delay:g} s")
    raise WebhookRetryError(f"webhook answered {status}")


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """The delay a ``Retry-After`` header asks for: seconds, or an HTTP date; None if unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def _post(
    client: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    allowed: frozenset[str],
) -> tuple[int, str | None]:
    """POST, following redirects within the origin; the last answer's status and Retry-After."""
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        check_host(url, allowed)
        status, retry_after, location = await _request(client, url, body, headers)
        if location is None:
            return status, retry_after
        target = urljoin(url, location)
        if _origin(target) != origin:
            where = urlsplit(target)
            raise PermanentError(
                f"webhook redirected to another host or port ({where.hostname}:{where.port or ''})"
            )
        url = target
    raise PermanentError(f"webhook redirected more than {MAX_REDIRECTS} times")


async def _request(
    client: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, str | None, str | None]:
    """One POST, a client span whose context its ``traceparent`` header carries; the
    answer's status, its Retry-After, and where it redirects (None if it does not).

    Of the body at most ``MAX_BODY_READ`` is read, so the connection serves the next
    delivery; a longer one is dropped with its connection: only the status matters.
    """
    attributes = _client_attributes(url) if tracing.on() else None
    with tracing.span("POST", kind="client", attributes=attributes) as span:
        traced = tracing.with_context(headers)
        async with client.post(url, data=body, headers=traced, allow_redirects=False) as response:
            status = response.status
            skimmed = await response.content.read(MAX_BODY_READ)
            if len(skimmed) == MAX_BODY_READ:
                response.close()
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                tracing.fail(span, f"webhook answered {status}")
    location = response.headers.get("location") if status in REDIRECTS else None
    return status, response.headers.get("retry-after"), location


def _client_attributes(url: str) -> dict[str, str | int]:
    """A delivery's span attributes: its origin, not the path nor the query (they may hold
    a secret)."""
    _, host, port = _origin(url)
    return {"http.request.method": "POST", "server.address": host or "", "server.port": port or 0}


def _what(error: aiohttp.ClientError) -> str:
    """What went wrong, without the URL (it may hold a secret): the error's kind."""
    return type(error).__name__


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port (the default one filled in) of ``url``."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, parts.hostname, parts.port or default


def client(timeout: float, allowed: frozenset[str], concurrency: int = 1) -> aiohttp.ClientSession:
    """The worker's webhook session (enter it with ``async with``): separate connect and
    read time-outs, no automatic redirects, no proxies from the environment, connections
    only to the addresses ``allowed`` admits, and ``concurrency`` of them kept alive."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=concurrency,
            resolver=PinnedResolver(EgressPolicy(allowed)),
            # The certificates httpx trusts (certifi's), as webhooks trusted before aiohttp
            # and as plug-ins' requests still do, not whatever the image's system holds.
            ssl=httpx.create_ssl_context(trust_env=False),
        ),
        timeout=aiohttp.ClientTimeout(sock_connect=min(timeout, 5.0), sock_read=timeout),
        auto_decompress=False,
        trust_env=False,
    )
