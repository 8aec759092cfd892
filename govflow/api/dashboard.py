"""The dashboard page, and the Content-Security-Policy that lets only its own code run.

The page is one file, ``dashboard.html``, with its style and script inline: no build
step, nothing fetched from elsewhere. The policy allows exactly those two inline blocks
(by their SHA-256) and requests to this server, so a dead letter's reason or an entity id
shown on the page can never run as code, even if the page had a bug that let it in.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

PAGE = resources.files("govflow.api").joinpath("dashboard.html").read_text(encoding="utf-8")


def _hashes(tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, flags=re.DOTALL)
    if not blocks:
        raise RuntimeError(f"dashboard.html has no <{tag}> block")
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks
    )


CSP = "; ".join(
    [
        "default-src 'none'",
        f"script-src {_hashes('script')}",
        f"style-src {_hashes('style')}",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
