"""The HTTP/1 client side's limits, which mitmproxy leaves open: a bounded request head (size and
field count, answered 431 before any other work), no obs-fold, head-read and idle timeouts, a
refusal answered before `100 Continue` and before the body, trailers that do not hang the
connection, and a cap on concurrent connections per client address.

mitmproxy has no hooks for these, so `HttpGuard.load` swaps four names in mitmproxy's layer
modules for the guarded subclasses below (see `_PATCHES`); everything else stays mitmproxy's."""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import h11
import structlog
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import connection, ctx, exceptions, http, version
from mitmproxy.addonmanager import Loader
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    HttpEvent,
    RequestHeaders,
    RequestProtocolError,
    ResponseEndOfMessage,
)
from mitmproxy.proxy.layers.http._hooks import HttpRequestHeadersHook

log = structlog.get_logger("egress-warden")

# The guarded layers below restate parts of these mitmproxy internals; re-read them on upgrade.
MITMPROXY_VERSION: Final = "12.3.1"

# After a refusal we stop answering but keep draining what is already in flight for a moment,
# so the client reads our answer instead of a reset (RFC 9112 section 9.6, "lingering close").
LINGER_SECONDS: Final = 2.0
LINGER_MAX_BYTES: Final = 1 << 20
# asyncio may run a timer up to its clock resolution early.
_TIMER_SLACK: Final = 0.01


class Refused(enum.StrEnum):
    """Why the guard answered or closed a client connection (X-Egress-Warden-Reason)."""

    HEAD_TOO_LARGE = "request_head_too_large"
    TOO_MANY_HEADERS = "too_many_headers"
    OBSOLETE_LINE_FOLDING = "obsolete_line_folding"
    INVALID_HEADER_LINE = "invalid_header_line"
    HEAD_TIMEOUT = "request_head_timeout"
    FRAMING_TOO_LARGE = "request_framing_too_large"
    TOO_MANY_CONNECTIONS = "too_many_connections"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The client-side limits, read from mitmproxy's options (0 turns a limit off)."""

    max_head_bytes: int
    max_headers: int
    head_timeout: float
    idle_timeout: float

    @classmethod
    def from_options(cls, options: Any) -> HttpLimits:
        return cls(
            options.max_request_head_bytes,
            options.max_request_headers,
            options.request_head_timeout,
            options.client_idle_timeout,
        )


def head_problem(lines: Sequence[bytes | bytearray], limits: HttpLimits) -> Refused | None:
    """What is wrong with a complete request head (request line and field lines), if anything."""
    if limits.max_headers and len(lines) - 1 > limits.max_headers:
        return Refused.TOO_MANY_HEADERS
    # Each line lost its CRLF when split; the head ends with one more.
    size = 2
    for number, line in enumerate(lines):
        size += len(line) + 2
        if number and line[:1] in (b" ", b"\t"):
            return Refused.OBSOLETE_LINE_FOLDING
        # A bare CR or a NUL is a line break or a terminator to some upstream parsers.
        if b"\r" in line or b"\0" in line:
            return Refused.INVALID_HEADER_LINE
    if limits.max_head_bytes and size > limits.max_head_bytes:
        return Refused.HEAD_TOO_LARGE
    return None


_STATUS: Final = {
    Refused.HEAD_TOO_LARGE: 431,
    Refused.TOO_MANY_HEADERS: 431,
    Refused.OBSOLETE_LINE_FOLDING: 400,
    Refused.INVALID_HEADER_LINE: 400,
    Refused.HEAD_TIMEOUT: 408,
    Refused.FRAMING_TOO_LARGE: 400,
}

_DETAIL: Final = {
    Refused.HEAD_TOO_LARGE: "request head too large",
    Refused.TOO_MANY_HEADERS: "too many request header fields",
    Refused.OBSOLETE_LINE_FOLDING: "obsolete line folding in a header field",
    Refused.INVALID_HEADER_LINE: "CR or NUL inside a header line",
    Refused.HEAD_TIMEOUT: "request head not received in time",
    Refused.FRAMING_TOO_LARGE: "chunk header, trailer section or pipelined data too large",
}


def refusal_bytes(reason: Refused) -> bytes:
    """A short, closing HTTP/1.1 answer for a request the guard refuses to read further."""
    detail = _DETAIL[reason]
    response = http.Response.make(
        _STATUS[reason],
        f"egress-warden: {detail}.\n",
        {
            "Content-Type": "text/plain; charset=utf-8",
            "Connection": "close",
            "Proxy-Status": f'egress-warden; error=http_request_error; details="{detail}"',
            "X-Egress-Warden-Reason": reason.value,
        },
    )
    return bytes(http1.assemble_response(response))


def _log_refusal(reason: Refused, client: connection.Client, answered: bool = True) -> None:
    log.warning(
        "egress.http.refused",
        **{
            "egress.reason": reason.value,
            "http.response.status_code": _STATUS.get(reason) if answered else None,
            "client.address": str(client.peername[0]) if client.peername else None,
        },
    )


class _ChunkedReaderDroppingTrailers(ChunkedReader):
    """mitmproxy's HTTP/1 layer raises NotImplementedError on a trailer section, which leaves the
    connection hanging. A recipient that removes the chunked coding may discard trailer fields
    (RFC 9112 section 7.1.2): they never reach the upstream, so none can smuggle a header."""

    def __call__(self, buf: ReceiveBuffer) -> h11.Data | h11.EndOfMessage | None:
        event = super().__call__(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            return h11.EndOfMessage()
        return event


_make_body_reader = _http1.make_body_reader


def make_body_reader(expected_size: int | None) -> _http1.TBodyReader:
    """mitmproxy's body reader for a message, with trailers dropped (requests and responses)."""
    if expected_size is None:
        return _ChunkedReaderDroppingTrailers()
    return _make_body_reader(expected_size)


class _Phase(enum.Enum):
    HEAD = "head"  # a request head is due by the deadline
    IDLE = "idle"  # between requests: the next one must start by the deadline
    LINGER = "linger"  # refused: drain input until the deadline, then close


class GuardedHttp1Server(_http1.Http1Server):
    """mitmproxy's HTTP/1 server side with the client-side limits of `HttpLimits`."""

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.limits = HttpLimits.from_options(context.options)
        self._phase: _Phase | None = None
        self._deadline = 0.0
        # Wakeups asked for and when each fires: at most a few per connection, never one per
        # request (a sleeping task per keep-alive request would pile up for idle_timeout).
        self._wakeups: dict[commands.RequestWakeup, float] = {}
        self._closed = False
        self._drained = 0

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Wakeup):
            yield from self._on_wakeup(event.command)
            return
        if self._phase is _Phase.LINGER and isinstance(event, events.ConnectionEvent):
            yield from self._drain(event)
            return
        if self._phase is _Phase.IDLE and isinstance(event, events.DataReceived) and event.data:
            yield from self._arm(_Phase.HEAD, self.limits.head_timeout)
        yield from super()._handle_event(event)
        if isinstance(event, events.Start):
            # The first head is due head_timeout after the TCP connection opened; inside an
            # intercepted TLS tunnel, after the handshake.
            client = self.context.client
            waited = 0.0 if client.tls else max(0.0, time.time() - client.timestamp_start)
            yield from self._arm(_Phase.HEAD, self.limits.head_timeout - waited)
        elif (
            self.limits.max_head_bytes
            and not self._closed
            and len(self.buf) > self.limits.max_head_bytes
            and self.state in (self.read_body, self.wait)
        ):
            # An endless chunk-size line, trailer section or pipelined head.
            yield from self._refuse_framing()

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        """mitmproxy 12.3.1's `Http1Server.read_headers`, with the head checked first."""
        if not isinstance(event, events.DataReceived):
            self._phase = None  # the client closed: nothing is due any more
            yield from super().read_headers(event)
            return
        request_head = self.buf.maybe_extract_lines()
        while request_head == []:  # empty lines before a request line are ignored
            request_head = self.buf.maybe_extract_lines()
        if request_head is None:
            if self.limits.max_head_bytes and len(self.buf) > self.limits.max_head_bytes:
                yield from self._refuse(Refused.HEAD_TOO_LARGE)
            return
        problem = head_problem(request_head, self.limits)
        if problem is not None:
            yield from self._refuse(problem)
            return
        self._phase = None
        try:
            self.request = http1.read_request_head([bytes(x) for x in request_head])
            expected_body_size = http1.expected_http_body_size(self.request)
        except ValueError as e:
            yield commands.SendData(self.conn, _http1.make_error_response(400, str(e)))
            yield commands.CloseConnection(self.conn)
            if self.request:
                yield ReceiveHttp(RequestHeaders(self.stream_id, self.request, False))
                yield ReceiveHttp(
                    RequestProtocolError(self.stream_id, str(e), ErrorCode.GENERIC_CLIENT_ERROR)
                )
            else:
                yield commands.Log(f"{self.conn.peername}: {e}")
            self.state = self.done
            return
        yield ReceiveHttp(RequestHeaders(self.stream_id, self.request, expected_body_size == 0))
        self.body_reader = make_body_reader(expected_body_size)
        self.state = self.read_body
        yield from self.state(event)

    def mark_done(
        self, *, request: bool = False, response: bool = False
    ) -> layer.CommandGenerator[None]:
        if self._closed:
            return
        yield from super().mark_done(request=request, response=response)
        if self._is_closed():  # a pipelined head was just refused
            return
        if self.state == self.read_headers:
            # Keep-alive: a pipelined head already started is due soon, else the next may idle.
            if self.buf:
                yield from self._arm(_Phase.HEAD, self.limits.head_timeout)
            else:
                yield from self._arm(_Phase.IDLE, self.limits.idle_timeout)
        else:
            self._phase = None

    def send(self, event: HttpEvent) -> layer.CommandGenerator[None]:
        yield from super().send(event)
        if (
            isinstance(event, ResponseEndOfMessage)
            and not self.request_done
            and self.state == self.read_body
            and self.response is not None
            and http1.connection_close(self.response.http_version, self.response.headers)
        ):
            # Answered with `Connection: close` before the request body ended (a refusal): stop
            # reading the body rather than take it all in only to throw it away.
            yield from self._linger()

    def _is_closed(self) -> bool:
        return self._closed

    def _refuse(self, reason: Refused) -> layer.CommandGenerator[None]:
        _log_refusal(reason, self.context.client)
        yield commands.SendData(self.conn, refusal_bytes(reason))
        yield from self._linger()

    def _refuse_framing(self) -> layer.CommandGenerator[None]:
        reason = Refused.FRAMING_TOO_LARGE
        _log_refusal(reason, self.context.client)
        if self.response is None or self.response.status_code < 200:
            yield commands.SendData(self.conn, refusal_bytes(reason))
        yield from self._linger()
        yield ReceiveHttp(
            RequestProtocolError(self.stream_id, _DETAIL[reason], ErrorCode.GENERIC_CLIENT_ERROR)
        )

    def _linger(self) -> layer.CommandGenerator[None]:
        self._closed = True
        self.state = self.done
        self.buf = ReceiveBuffer()
        yield commands.CloseTcpConnection(self.conn, half_close=True)
        yield from self._arm(_Phase.LINGER, LINGER_SECONDS)

    def _drain(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived):
            self._drained += len(event.data)
            if self._drained <= LINGER_MAX_BYTES:
                return
        self._phase = None
        yield commands.CloseConnection(self.conn)

    def _arm(self, phase: _Phase, timeout: float) -> layer.CommandGenerator[None]:
        """Enter `phase`, due `timeout` seconds from now (no deadline if the limit is off)."""
        if self._limit_off(phase):
            self._phase = None
            return
        now = time.monotonic()
        self._phase, self._deadline = phase, now + max(0.0, timeout)
        if not any(fires <= self._deadline for fires in self._wakeups.values()):
            wakeup = commands.RequestWakeup(self._deadline - now)
            self._wakeups[wakeup] = self._deadline
            yield wakeup

    def _limit_off(self, phase: _Phase) -> bool:
        if phase is _Phase.HEAD:
            return self.limits.head_timeout <= 0
        return phase is _Phase.IDLE and self.limits.idle_timeout <= 0

    def _on_wakeup(self, command: commands.RequestWakeup) -> layer.CommandGenerator[None]:
        self._wakeups.pop(command, None)
        if self._phase is None:
            return
        now = time.monotonic()
        if now + _TIMER_SLACK < self._deadline:
            yield from self._arm(self._phase, self._deadline - now)
            return
        phase, self._phase = self._phase, None
        if phase is _Phase.HEAD and self.state == self.read_headers:
            yield from self._refuse(Refused.HEAD_TIMEOUT)
        elif phase is _Phase.IDLE and self.state == self.read_headers and not self.buf:
            self._closed = True
            self.state = self.done
            yield commands.CloseConnection(self.conn)
        elif phase is _Phase.LINGER:
            yield commands.CloseConnection(self.conn)


class GuardedHttpStream(http_layers.HttpStream):
    """mitmproxy's HTTP stream, except that a request refused in `requestheaders` (a response
    set by then) is answered at once: no `100 Continue`, and its body is not read first."""

    def state_wait_for_request_headers(self, event: RequestHeaders) -> layer.CommandGenerator[None]:
        # Drive mitmproxy's own handler and step in right after the requestheaders hook: that
        # is where it would send `100 Continue` and go on to consume the body.
        inner = super().state_wait_for_request_headers(event)
        reply: Any = None
        while True:
            try:
                command = inner.send(reply)
            except StopIteration:
                return
            reply = yield command
            if not isinstance(command, HttpRequestHeadersHook):
                continue
            if self.flow.response is None or self.flow.error is not None:
                continue
            self.flow.request.headers.pop("expect", None)
            request = self.flow.request
            if not (event.end_stream or request.is_http2 or request.is_http3):
                # (HTTP/2 and 3 end the stream instead; `Connection: close` is not theirs.)
                inner.close()
                yield from self._answer_before_body()
                return

    def _answer_before_body(self) -> layer.CommandGenerator[None]:
        assert self.flow.response is not None
        # The client learns the body is unwanted; the connection closes once the answer is out.
        self.flow.response.headers["connection"] = "close"
        self.client_state = self.state_done  # lets send_response finish the stream
        yield from self.send_response()
        self.client_state = self.state_errored  # body events already queued are dropped


class GuardedHttpProxy(modes.HttpProxy):
    """mitmproxy's regular-mode top layer, plus: a client that sends nothing at all within
    `request_head_timeout` is disconnected (the HTTP layer, which times heads, starts only
    with the first byte)."""

    _child: layer.NextLayer
    _silence: commands.RequestWakeup | None = None

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            self._child = layer.NextLayer(self.context)
            timeout = self.context.options.request_head_timeout
            if timeout > 0:
                self._silence = commands.RequestWakeup(timeout)
                yield self._silence
            yield from self._child.handle_event(event)
        elif isinstance(event, events.Wakeup) and event.command is self._silence:
            self._silence = None
            if self._child.layer is None:
                _log_refusal(Refused.HEAD_TIMEOUT, self.context.client, answered=False)
                yield commands.CloseConnection(self.context.client)
        else:
            yield from self._child.handle_event(event)


_PATCHES: Final[tuple[tuple[object, str, object], ...]] = (
    (http_layers, "Http1Server", GuardedHttp1Server),
    (http_layers, "HttpStream", GuardedHttpStream),
    (modes, "HttpProxy", GuardedHttpProxy),
    (_http1, "make_body_reader", make_body_reader),
)
_ORIGINALS: Final = tuple((module, name, getattr(module, name)) for module, name, _ in _PATCHES)


def install_layer_guards() -> None:
    """Make mitmproxy build the guarded layers (idempotent)."""
    for module, name, guarded in _PATCHES:
        setattr(module, name, guarded)


def remove_layer_guards() -> None:
    for module, name, original in _ORIGINALS:
        setattr(module, name, original)


_OPTIONS: Final = (
    "max_request_head_bytes",
    "max_request_headers",
    "request_head_timeout",
    "client_idle_timeout",
    "max_connections_per_client",
)


def _check_limit(name: str, value: float) -> None:
    if value < 0:
        raise exceptions.OptionsError(f"{name} must be 0 (off) or more, not {value}")


def _env_default(option: str, default: float) -> float:
    """EGRESS_WARDEN_<OPTION> overrides an option's default."""
    name = f"EGRESS_WARDEN_{option.upper()}"
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError as exc:
        raise exceptions.OptionsError(f"{name}={text!r} is not a number") from exc
    _check_limit(name, value)
    return value


class HttpGuard:
    """Client-side HTTP/1 limits and a per-address connection cap. An option's default can be
    set with EGRESS_WARDEN_<OPTION NAME IN CAPITALS> (the tests use small ones)."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}  # client address -> its open TCP connections
        self._counted: dict[str, str] = {}  # client connection id -> its address

    def load(self, loader: Loader) -> None:
        def add(name: str, typespec: type, default: float, help: str) -> None:
            loader.add_option(name, typespec, typespec(_env_default(name, default)), help)

        add("max_request_head_bytes", int, 64 * 1024, "Largest request head read (431 beyond).")
        add("max_request_headers", int, 100, "Most request header fields (431 beyond).")
        add("request_head_timeout", float, 10.0, "Seconds to receive a request head (408).")
        add("client_idle_timeout", float, 60.0, "Seconds a client may idle between requests.")
        add(
            "max_connections_per_client",
            int,
            1024,
            "Concurrent TCP connections per client address; more are closed at once.",
        )
        if version.VERSION != MITMPROXY_VERSION:
            log.warning(
                "egress.http.guard",
                detail=f"written against mitmproxy {MITMPROXY_VERSION}, running {version.VERSION}",
            )
        install_layer_guards()

    def configure(self, updated: set[str]) -> None:
        # Layers and hooks read the options when they need them; only check them here.
        for name in updated.intersection(_OPTIONS):
            _check_limit(name, getattr(ctx.options, name))

    def done(self) -> None:
        remove_layer_guards()

    def client_connected(self, client: connection.Client) -> None:
        if client.transport_protocol != "tcp" or not client.peername:
            return
        address = str(client.peername[0])
        count = self._open.get(address, 0)
        cap = ctx.options.max_connections_per_client
        if cap and count >= cap:
            _log_refusal(Refused.TOO_MANY_CONNECTIONS, client, answered=False)
            client.error = "egress-warden: too many connections from this address"
            return
        self._open[address] = count + 1
        self._counted[client.id] = address

    def client_disconnected(self, client: connection.Client) -> None:
        address = self._counted.pop(client.id, None)
        if address is None:
            return
        left = self._open[address] - 1
        if left:
            self._open[address] = left
        else:
            del self._open[address]
