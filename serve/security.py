"""The web app's security headers: a Content-Security-Policy that pins the templates' inline
blocks by hash, and the ASGI middleware that adds the headers to every response (a 500 included).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

from serve.page import TEMPLATES


def _inline_hashes(tag: str) -> list[str]:
    """CSP hash sources of every inline ``<tag>`` block of the templates. A block with template
    syntax in it would render to other bytes than its hash: refused here, at startup."""
    out = []
    for path in sorted(TEMPLATES.glob("*.html")):
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", path.read_text(encoding="utf-8"), re.S):
            if any(mark in body for mark in ("{{", "{%", "{#")):
                raise RuntimeError(f"{path.name}: an inline <{tag}> holds template syntax; CSP cannot pin it")
            digest = base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode("ascii")
            out.append(f"'sha256-{digest}'")
    return out


def security_headers() -> dict[str, str]:
    """Headers on every response. The CSP allows the templates' own inline script and style block
    by hash, nothing else; ``style=`` attributes (the top-3 bar widths) need 'unsafe-inline' in
    ``style-src``, which a browser reading ``style-src-elem`` applies to attributes only; images
    from the app itself (plots) and ``data:`` (the Grad-CAM overlays)."""
    scripts = " ".join(_inline_hashes("script")) or "'none'"
    styles = " ".join(_inline_hashes("style")) or "'none'"
    csp = (
        f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; style-src-elem {styles}; "
        "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


class SecurityHeaders:
    """ASGI middleware adding :func:`security_headers` to every HTTP response (a header the app
    set itself is kept)."""

    def __init__(self, app: Any, headers: dict[str, str]):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
