"""The admin console: one page, one script, one style sheet, served from package data on the
control listener without a token (they hold no data; every API call the page makes carries the
bearer token the user enters). Nothing is loaded from elsewhere, and a strict
Content-Security-Policy keeps it that way: no inline script or style, no other origin."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def _handler(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve


def add_console_routes(app: FastAPI) -> None:
    """Serve the console's three files (read once, at start)."""
    for path, (name, media_type) in ASSETS.items():
        handler = _handler(_read(name), media_type)
        app.add_api_route(path, handler, methods=["GET"], include_in_schema=False)
