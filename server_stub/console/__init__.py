"""The admin console at /console: server-rendered pages (Jinja2) with htmx, served by
`addin-server serve` beside the API.

- `session`: sign-in with the API's tokens, the session cookie, CSRF tokens;
- `fleet`: every device's state per add-in, counted from reports, refreshed from what changed;
- `plot`: the add-in timeline as inline SVG;
- `pages`: the routes (pages, writes, the server-sent event stream of counts);
- `templates/`, `static/` (htmx, vendored; the console's own script and style).

Why server-rendered pages and htmx rather than a single-page app: docs/server.md
("The console").
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_stub.roles import Principals
from server_stub.service import Service

HERE = Path(__file__).parent

SECURITY_HEADERS = [
    # No other site may frame the console (clickjacking), nor may it load anything but its
    # own script and style; inline script is refused.
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
        b"object-src 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on the
    # console's own form posts, and treats them as cross-site (no SameSite=Strict cookie).
    (b"referrer-policy", b"same-origin"),
]


class ConsoleHeaders:
    """Adds `SECURITY_HEADERS` to every answer under /console (pages, fragments, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith("/console"):
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def mount_console(app: FastAPI, service: Service, principals: Principals, *, https: bool) -> None:
    from server_stub.console.pages import Console

    console = Console(service, principals, https=https)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.include_router(console.router())
    app.add_middleware(ConsoleHeaders)
