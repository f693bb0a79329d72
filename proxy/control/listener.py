"""The control listener's connections, below the ASGI app: at most so many open connections
per client address, a deadline for a request head to arrive whole, and a graceful close when a
request is refused while its body is still coming.

uvicorn alone bounds a head that arrives in pieces (`h11_max_incomplete_event_size`; the
control guard bounds one that arrives whole) and the idle time between requests
(`timeout_keep_alive`), but not how long a client may trickle a head in once it has sent a
byte, nor how many connections one client holds; both cost a socket and a protocol object
each, so a single local process could starve the listener.

When the control guard refuses a request before reading its body (401, 413), closing the
socket with the body unread makes the kernel send RST, and a client still sending may lose the
answer with it (measured: one refusal in eight on a kept-alive connection). So such a close
half-closes instead (the answer, then FIN), and reads and drops what still comes for a bounded
time and size before closing, as web servers' "lingering close" does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_CONNECTIONS_PER_CLIENT = 64
HEAD_TIMEOUT_SECONDS = 10.0
MAX_HEAD_BYTES = 16 * 1024  # request line and headers: a bearer token fits many times over
KEEP_ALIVE_SECONDS = 5
MAX_CONCURRENCY = 256  # connections + running requests, all clients; beyond it uvicorn says 503
LINGER_SECONDS = 2.0  # after refusing a request mid-body: how long to drain before closing
LINGER_BYTES = 1 << 20  # ... and how much of the unread body to drop at most

_BUSY_BODY = json.dumps(
    {"error": "too_many_connections", "detail": "this client has too many open connections"}
).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n"
    b"connection: close\r\n"
    b"retry-after: 1\r\n"
    b"\r\n" + _BUSY_BODY
)


class GracefulCloseTransport(asyncio.Transport):
    """The socket's transport, but `close()` while `client_sending()` half-closes: the answer
    is flushed and followed by FIN, then input is dropped until the client closes too, or for
    at most `LINGER_SECONDS` / `LINGER_BYTES`."""

    def __init__(
        self,
        inner: asyncio.Transport,
        client_sending: Callable[[], bool],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._client_sending = client_sending
        self._loop = loop
        self._closing = False
        self._dropped = 0
        self._deadline: asyncio.TimerHandle | None = None
        self.lingering = False

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._inner.is_closing():
            return  # the client went away first
        if self._client_sending() and self._inner.can_write_eof():
            try:
                self._inner.write_eof()
            except OSError:  # the client reset the connection meanwhile: nothing to linger for
                self._inner.close()
                return
            self.lingering = True
            self._inner.resume_reading()
            self._deadline = self._loop.call_later(LINGER_SECONDS, self.finish)
        else:
            self._inner.close()

    def drop(self, size: int) -> None:
        """Data that arrived while lingering: count it, close once it is too much."""
        self._dropped += size
        if self._dropped > LINGER_BYTES:
            self.finish()

    def finish(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._closing = True
        self._inner.close()

    def is_closing(self) -> bool:
        return self._closing or self._inner.is_closing()

    # -- plain delegation --------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview[int]) -> None:
        self._inner.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview[int]]) -> None:
        self._inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def abort(self) -> None:
        self._closing = True
        self._inner.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def pause_reading(self) -> None:
        if not self.lingering:
            self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()


def limited_h11_protocol(
    max_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
    head_timeout: float = HEAD_TIMEOUT_SECONDS,
) -> type[H11Protocol]:
    """An h11 protocol class for `uvicorn.Config(http=...)`: a client's connection beyond
    `max_per_client` open ones is answered 503 and closed; a request head (or the next one on a
    kept-alive connection) not complete within `head_timeout` seconds closes the connection; a
    close while the request body is still coming is graceful (`GracefulCloseTransport`).
    Each call makes a class with its own counts: one per server."""
    open_per_client: dict[str, int] = {}

    class LimitedH11Protocol(H11Protocol):
        _counted_as: str | None = None
        _head_deadline: asyncio.TimerHandle | None = None
        _graceful: GracefulCloseTransport | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._graceful = GracefulCloseTransport(transport, self._client_sending, self.loop)
            super().connection_made(self._graceful)
            client = self.client[0] if self.client else ""
            if open_per_client.get(client, 0) >= max_per_client:
                transport.write(_BUSY_RESPONSE)
                transport.close()
                return
            open_per_client[client] = open_per_client.get(client, 0) + 1
            self._counted_as = client
            self._arm_head_deadline()

        def _client_sending(self) -> bool:
            return self.conn.their_state is h11.SEND_BODY

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_deadline()
            if self._graceful is not None and self._graceful.lingering:
                self._graceful.finish()
            client, self._counted_as = self._counted_as, None
            if client is not None:
                left = open_per_client[client] - 1
                if left:
                    open_per_client[client] = left
                else:
                    del open_per_client[client]
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._graceful is not None and self._graceful.lingering:
                self._graceful.drop(len(data))  # the rest of a refused request's body
                return
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_head_deadline()  # the head is in (or the connection is done)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_head_deadline()  # the next request's head has the same deadline

        def _arm_head_deadline(self) -> None:
            self._disarm_head_deadline()
            self._head_deadline = self.loop.call_later(head_timeout, self._head_too_slow)

        def _disarm_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()

    return LimitedH11Protocol


def control_server_options() -> dict[str, Any]:
    """Keyword arguments for the control listener's `uvicorn.Config`."""
    return {
        "http": limited_h11_protocol(),
        "limit_concurrency": MAX_CONCURRENCY,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
    }
