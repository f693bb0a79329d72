"""The control API's door: the token is checked and the body size capped before the app reads
a byte of the body.

A plain ASGI middleware on purpose: FastAPI parses a request body before any dependency runs
(so a token dependency alone lets anyone make the server read and parse 10 MB), and Starlette's
BaseHTTPMiddleware would buffer the body itself.
"""

from __future__ import annotations

import json
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.control.access import AccessDenied, Caller, TokenVerifier, authenticate

MAX_BODY_BYTES = 64 * 1024  # the largest legitimate body (a grant or a check) is under 5 KiB
# Header names and values together. The server bounds a head that arrives in pieces; one that
# arrives in a single read (up to 256 KiB) is only bounded here.
MAX_HEADER_BYTES = 16 * 1024
# The console's page and assets hold no data (its API calls carry the token the user enters).
CONSOLE_PATHS = frozenset({"/", "/console/console.js", "/console/console.css"})
PUBLIC_PATHS = frozenset({"/healthz", *CONSOLE_PATHS})
# Answered whatever the Host header says: a probe may name the listener any way it likes.
ANY_HOST_PATHS = frozenset({"/healthz"})
CALLER_STATE_KEY = "egress_warden.caller"  # where the authenticated Caller is left in scope


def caller_of(scope: Scope) -> Caller | None:
    """The caller the guard authenticated for this request, if it did."""
    caller = scope.get("state", {}).get(CALLER_STATE_KEY)
    return caller if isinstance(caller, Caller) else None


async def refuse(send: Send, status: int, code: str, detail: str) -> None:
    """Answer `{"error", "detail"}` and close the connection: the client may still be sending a
    body nobody will read, and a kept-alive connection would have the server read it."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"cache-control", b"no-store"),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def host_allowed(scope: Scope, names: Collection[str]) -> bool:
    """Does the request's Host name this listener? Allowed: the address the connection arrived
    on, `localhost` and each of `names`, each bare or with the listener's port. A DNS-rebinding
    page sends its own name and is refused (and a browser sends a bare address only to port
    80 or 443, so a bare address is no page's either). A request without Host passes: every
    browser sends one, so such a request is no page's."""
    hosts = [value for name, value in scope.get("headers", ()) if name.lower() == b"host"]
    if not hosts:
        return True
    if len(hosts) > 1:
        return False
    host = hosts[0].decode("latin-1").strip().lower()
    server = scope.get("server")
    allowed = {name.lower() for name in names}
    if server:
        default = "443" if scope.get("scheme") == "https" else "80"
        address, port = str(server[0]).lower(), str(server[1] or default)
        address = f"[{address}]" if ":" in address else address
        bases = [address, "localhost", *allowed]
        allowed.update(bases)
        allowed.update(f"{base}:{port}" for base in bases)
    return host in allowed


def _declared_length(scope: Scope) -> int | None:
    """The Content-Length the request declares; -1 if it is not a number."""
    declared: int | None = None
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.strip()
            if not text.isdigit():
                return -1
            declared = max(declared or 0, int(text))
    return declared


class ControlGuard:
    """Authenticate every request but `public_paths` from its headers alone, then let through
    at most `max_body` bytes of body (declared or streamed); anything else is answered here."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        verify: TokenVerifier,
        max_body: int = MAX_BODY_BYTES,
        public_paths: Collection[str] = PUBLIC_PATHS,
        hosts: Collection[str] | None = None,
    ) -> None:
        self.app = app
        self.verify = verify
        self.max_body = max_body
        self.public_paths = frozenset(public_paths)
        # Host names served besides the listener's address; None: no Host check (the control
        # app always checks: see create_app).
        self.hosts = None if hosts is None else tuple(h.lower() for h in hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            # No WebSocket routes exist; refuse the handshake rather than authenticate it.
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = scope.get("headers", ())
        if sum(len(name) + len(value) for name, value in headers) > MAX_HEADER_BYTES:
            await refuse(
                send, 431, "headers_too_large", f"headers larger than {MAX_HEADER_BYTES} bytes"
            )
            return
        if (
            self.hosts is not None
            and scope["path"] not in ANY_HOST_PATHS
            and not host_allowed(scope, self.hosts)
        ):
            await refuse(
                send,
                421,
                "misdirected_request",
                "this Host is not one the control API serves (add it with run --control-host)",
            )
            return
        if scope["path"] not in self.public_paths:
            try:
                caller = authenticate(headers, self.verify)
            except AccessDenied as denied:
                await refuse(send, denied.status, denied.code, denied.detail)
                return
            scope.setdefault("state", {})[CALLER_STATE_KEY] = caller
        declared = _declared_length(scope)
        if declared == -1:
            await refuse(send, 400, "bad_request", "Content-Length is not a number")
            return
        if declared is not None and declared > self.max_body:
            await refuse(send, 413, "too_large", self._too_large())
            return
        await self._capped(scope, receive, send)

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body} bytes"

    async def _capped(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app with a receive that stops at `max_body` bytes (a chunked body has no
        declared length): past it the client is answered 413 and the app sees a disconnect."""
        received = 0
        started = False  # the app began its response
        cut = False  # the body went past the cap: the app reads no more of it
        answered = False  # ... and the client got our 413

        async def capped_receive() -> Message:
            nonlocal received, cut, answered
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    cut = True
                    if not started:
                        await refuse(send, 413, "too_large", self._too_large())
                        answered = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # this request was answered here; drop what the app says after
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, capped_receive, guarded_send)
