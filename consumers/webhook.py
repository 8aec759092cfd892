"""Webhook delivery for the ``notify`` action: signed, idempotent, at least once."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urljoin, urlsplit

import httpx

from schemas.errors import PermanentError

SIGNATURE_HEADER = "X-Govflow-Signature"
MAX_REDIRECTS = 3


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
        raise PermanentError(f"webhook {url!r} is not an http(s) URL")
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

    Redirects are followed only within the same host. A 4xx is permanent; a 5xx, a
    timeout or a connection error raises something else, which means "retry".

    Raises:
        PermanentError: a 4xx, a redirect to another host, or a refused URL.
        httpx.HTTPError: a time-out or a connection error (retried).
    """
    headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
    if secret:  # a signature under an empty key would prove nothing
        headers[SIGNATURE_HEADER] = sign(secret, body)
    host = urlsplit(url).hostname
    for _ in range(MAX_REDIRECTS + 1):
        check_host(url, allowed)
        response = await client.post(url, content=body, headers=headers)
        if not response.is_redirect:
            break
        target = urljoin(url, response.headers.get("location", ""))
        if urlsplit(target).hostname != host:
            raise PermanentError(
                f"webhook redirected to another host ({urlsplit(target).hostname})"
            )
        url = target
    else:
        raise PermanentError(f"webhook redirected more than {MAX_REDIRECTS} times")
    if 400 <= response.status_code < 500:
        raise PermanentError(f"webhook answered {response.status_code}")
    if response.status_code >= 300:
        raise RuntimeError(f"webhook answered {response.status_code}")
    return response.status_code


def client(timeout: float) -> httpx.AsyncClient:
    """The shared webhook client: separate connect and read time-outs, no automatic redirects."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        follow_redirects=False,
        trust_env=False,
    )
