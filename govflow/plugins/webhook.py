"""Webhook delivery for the ``notify`` action: signed, idempotent, at least once.

A receiver is not trusted to behave: the connection gets ``min(timeout, 5)`` seconds,
each read ``timeout`` seconds, and the whole delivery, redirects included, the sum of the
two, so an answer dripped a byte at a time cannot hold a worker for long. Of the body
no more than 64 KiB is read: the status says everything, and a receiver that streams an
endless body has still answered. Redirects stay on the same origin (scheme, host and
port), within the operator's allow-list.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urljoin, urlsplit

import anyio
import httpx

from govflow.schemas.errors import PermanentError

SIGNATURE_HEADER = "X-Govflow-Signature"
MAX_REDIRECTS = 3
MAX_BODY_READ = 64 * 1024


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_host(url: str, allowed: frozenset[str]) -> None:
    """Refuse a URL that is not http(s), or whose host the operator did not allow.

    Raises:
        PermanentError: the URL can never be delivered to.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Scheme and host only: the URL may carry a password.
        raise PermanentError(
            f"webhook URL ({parts.scheme or 'no scheme'}://{parts.hostname or ''}) is not http(s)"
        )
    if allowed and parts.hostname not in allowed:
        raise PermanentError(
            f"webhook host {parts.hostname} is not in GOVFLOW_WEBHOOK_ALLOWED_HOSTS"
        )


async def deliver(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    *,
    idempotency_key: str,
    secret: str,
    allowed: frozenset[str],
) -> int:
    """POST ``body`` and return the status code.

    Redirects are followed only within the same origin, and the whole delivery gets the
    client's connect and read time-outs together, in all. A 4xx is permanent; a 5xx, a
    timeout or a connection error raises something else, which means "retry".

    Raises:
        PermanentError: a 4xx, a redirect elsewhere, or a refused URL.
        httpx.HTTPError: a time-out or a connection error (retried).
    """
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
    if secret:  # a signature under an empty key would prove nothing
        headers[SIGNATURE_HEADER] = sign(secret, body)
    # A connection, then an answer: each may take its own time-out, the two no more.
    total = (client.timeout.connect or 0.0) + (client.timeout.read or 0.0) or None
    with anyio.move_on_after(total) as deadline:
        status = await _post(client, url, body, headers, allowed)
    if deadline.cancelled_caught:
        raise httpx.ReadTimeout(f"webhook took longer than {total} s in all")
    if 400 <= status < 500:
        raise PermanentError(f"webhook answered {status}")
    if status >= 300:
        raise RuntimeError(f"webhook answered {status}")
    return status


async def _post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    allowed: frozenset[str],
) -> int:
    """POST, following redirects within the origin; the status of the last answer."""
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        check_host(url, allowed)
        async with client.stream("POST", url, content=body, headers=headers) as response:
            status, redirect = response.status_code, response.is_redirect
            location = response.headers.get("location", "")
            await _skim(response)
        if not redirect:
            return status
        target = urljoin(url, location)
        if _origin(target) != origin:
            where = urlsplit(target)
            raise PermanentError(
                f"webhook redirected to another host or port ({where.hostname}:{where.port or ''})"
            )
        url = target
    raise PermanentError(f"webhook redirected more than {MAX_REDIRECTS} times")


async def _skim(response: httpx.Response) -> None:
    """Read a short body, so the connection serves the next delivery; leave a long one.

    Only the status matters: a body past ``MAX_BODY_READ`` is dropped with its connection.
    """
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read >= MAX_BODY_READ:
            return


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port (the default one filled in) of ``url``."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, parts.hostname, parts.port or default


def client(timeout: float) -> httpx.AsyncClient:
    """The shared webhook client: separate connect and read time-outs, no automatic redirects."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        follow_redirects=False,
        trust_env=False,
    )
