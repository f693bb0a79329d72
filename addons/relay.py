"""The raw-tunnel relay: once a tunnel is admitted (and its ClientHello checked), its two
sockets leave mitmproxy's per-chunk event pump and the event loop moves the bytes directly,
zero-copy through a pipe with `os.splice` on Linux, or with `recv_into`/`send` elsewhere.

mitmproxy still accepts the client, parses CONNECT (or SOCKS5, or the transparent redirect),
runs the hooks that decide, and dials the pinned upstream; `RelayedTunnel` is the layer it
hands the tunnel to, and the point where the sockets are taken over. How and why that is safe
(which mitmproxy internals it relies on) is written up in docs/relay.md.

Byte counts, the close event, half-close, idle timeout, back-pressure and revocation are kept:
each direction holds at most one pipe (or buffer) of bytes before it stops reading its source.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import os
import socket
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from mitmproxy import connection
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.server import ConnectionHandler, ConnectionIO

log = structlog.get_logger("egress-warden")

RELAY_ENV = "EGRESS_WARDEN_RELAY"
HAVE_SPLICE = hasattr(os, "splice") and hasattr(os, "SPLICE_F_MOVE")
# Bytes one direction may hold in flight before it stops reading its source (back-pressure).
# A 1 GB download through the proxy here: 64 KiB pipes 1.0 GB/s, 256 KiB 1.6, 1 MiB 1.6-2.2;
# 256 KiB bounds what a stalled reader pins in kernel memory at 512 KiB per tunnel. Idle pipes
# cost nothing (the kernel allocates pipe pages as they fill).
PIPE_SIZE = 256 * 1024
COPY_BUFFER = 64 * 1024  # the fallback reads this much at a time (bytes it cannot send wait)
IDLE_PIPES = 256  # empty pipes kept for reuse: a tunnel holds a pipe only while bytes wait in it
_HANDOVER_WAIT = 5.0  # seconds mitmproxy may take to hand over bytes it had already read


class RelayMode(enum.StrEnum):
    """Who moves a raw tunnel's bytes (`EGRESS_WARDEN_RELAY`)."""

    SPLICE = "splice"  # the event loop, zero-copy through a pipe (Linux)
    COPY = "copy"  # the event loop, recv_into/send through a buffer (portable)
    MITMPROXY = "mitmproxy"  # mitmproxy's TCP layer, one Python event per chunk (the old path)


def relay_mode(environ: Mapping[str, str] = os.environ) -> RelayMode:
    """The relay named by `EGRESS_WARDEN_RELAY` (default: splice where the OS has it)."""
    value = environ.get(RELAY_ENV, "").strip().lower()
    if not value:
        return RelayMode.SPLICE if HAVE_SPLICE else RelayMode.COPY
    try:
        mode = RelayMode(value)
    except ValueError:
        names = ", ".join(m.value for m in RelayMode)
        raise ValueError(f"{RELAY_ENV}={value!r}: expected one of {names}") from None
    return RelayMode.COPY if mode is RelayMode.SPLICE and not HAVE_SPLICE else mode


class Meter(Protocol):
    """Where a tunnel's bytes are counted (the warden's per-tunnel record)."""

    sent: int  # client -> upstream
    received: int  # upstream -> client


class _Way:
    """One direction of a tunnel: bytes read from `src` are written to `dst`."""

    __slots__ = (
        "done",
        "dst",
        "eof",
        "from_client",
        "in_pipe",
        "pending",
        "pipe_r",
        "pipe_w",
        "reading",
        "src",
        "writing",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        self.src = src
        self.dst = dst
        self.from_client = from_client
        # Bytes to write before any other: what mitmproxy had read before the handover; on the
        # copy path also what the destination could not take yet.
        self.pending = b""
        self.pipe_r = -1  # the splice pipe, taken from the pool while bytes wait in it
        self.pipe_w = -1
        self.in_pipe = 0
        self.eof = False  # the source ended its stream (FIN)
        self.done = False  # ... and everything before it was written and the FIN passed on
        self.reading = False
        self.writing = False

    def held(self) -> int:
        return len(self.pending) + self.in_pipe


class _PipePool:
    """Empty splice pipes for reuse: a direction takes one when bytes arrive and gives it back
    once they are all written, so idle tunnels hold none (the loop is single-threaded)."""

    def __init__(self) -> None:
        self._idle: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        if self._idle:
            return self._idle.pop()
        import fcntl  # Linux only, as splice is

        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works, in smaller steps
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return r, w

    def give(self, way: _Way) -> None:
        """Take `way`'s pipe back: reused if empty and wanted, else closed."""
        if way.pipe_r < 0:
            return
        if way.in_pipe == 0 and len(self._idle) < IDLE_PIPES:
            self._idle.append((way.pipe_r, way.pipe_w))
        else:
            os.close(way.pipe_r)
            os.close(way.pipe_w)
        way.pipe_r = way.pipe_w = -1
        way.in_pipe = 0


_pipes = _PipePool()
# The copy path reads into one buffer shared by every tunnel (the loop runs one callback at a
# time); only bytes a destination cannot take yet are kept, by their direction.
_scratch = memoryview(bytearray(COPY_BUFFER))


_live: weakref.WeakSet[Relay] = weakref.WeakSet()


def abort_all() -> None:
    """Close every relay still running (shutdown: their tunnels report what they carried)."""
    for relay in list(_live):
        relay.abort()


class Relay:
    """Moves bytes between two connected non-blocking sockets until both directions have
    ended (or either side fails), counting them into `meter`; then calls `on_end` once."""

    def __init__(
        self,
        client: socket.socket,
        server: socket.socket,
        meter: Meter,
        *,
        splice: bool,
        idle_timeout: float,
        on_end: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = client
        self._server = server
        self._meter = meter
        self._splice = splice
        self._idle_timeout = idle_timeout
        self._on_end = on_end
        self._ways = (_Way(client, server, True), _Way(server, client, False))
        self._last_activity = time.monotonic()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.finished = False
        _live.add(self)

    def start(self, pending_up: bytes, pending_down: bytes) -> None:
        """Write what mitmproxy had already read (each way), then relay."""
        self._ways[0].pending, self._ways[1].pending = pending_up, pending_down
        if self._idle_timeout > 0:
            self._idle_timer = self._loop.call_later(self._idle_timeout, self._check_idle)
        for way in self._ways:
            self._flush(way)

    def inject(self, from_client: bool, data: bytes) -> None:
        """Bytes mitmproxy read from one side after the handover: written before more is read."""
        way = self._ways[0 if from_client else 1]
        way.pending += data
        self._flush(way)

    def abort(self) -> None:
        """Stop at once: both peers see the connection end; `on_end` is not called."""
        self._finish(notify=False, hard=True)

    # -- moving bytes ------------------------------------------------------------------------

    def _on_readable(self, way: _Way) -> None:
        try:
            if self._splice:
                if way.pipe_r < 0:
                    way.pipe_r, way.pipe_w = _pipes.take()
                n = os.splice(
                    way.src.fileno(),
                    way.pipe_w,
                    PIPE_SIZE - way.in_pipe,
                    flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
                )
            else:
                n = way.src.recv_into(_scratch)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # a reset or any other failure of the source ends the tunnel
            self._finish(notify=True, hard=True)
            return
        if n == 0:
            way.eof = True
        elif self._splice:
            way.in_pipe += n
        else:
            try:
                sent = way.dst.send(_scratch[:n])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # the destination is gone: the tunnel ends
                self._finish(notify=True, hard=True)
                return
            self._count(way, sent)
            if sent < n:
                way.pending = bytes(_scratch[sent:n])
        self._flush(way)

    def _on_writable(self, way: _Way) -> None:
        self._flush(way)

    def _flush(self, way: _Way) -> None:
        """Write what `way` holds; then read more, wait for the destination, or pass on EOF."""
        if self.finished:
            return
        written = 0
        try:
            if way.pending:
                n = way.dst.send(way.pending)
                way.pending = way.pending[n:]
                written += n
            while not way.pending and way.in_pipe:
                n = os.splice(
                    way.pipe_r,
                    way.dst.fileno(),
                    way.in_pipe,
                    flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
                )
                way.in_pipe -= n
                written += n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the destination is gone (reset, broken pipe): the tunnel ends
            self._count(way, written)
            self._finish(notify=True, hard=True)
            return
        self._count(way, written)
        if way.held():
            # The destination is full: stop reading the source until it drains.
            self._watch(way, read=False, write=True)
            return
        _pipes.give(way)
        if not way.eof:
            self._watch(way, read=True, write=False)
            return
        self._watch(way, read=False, write=False)
        if not way.done:
            way.done = True
            with contextlib.suppress(OSError):
                way.dst.shutdown(socket.SHUT_WR)  # the half-close goes on to the other side
        if all(w.done for w in self._ways):
            self._finish(notify=True, hard=False)

    def _count(self, way: _Way, n: int) -> None:
        if n:
            self._last_activity = time.monotonic()
            if way.from_client:
                self._meter.sent += n
            else:
                self._meter.received += n

    def _watch(self, way: _Way, *, read: bool, write: bool) -> None:
        if read != way.reading:
            if read:
                self._loop.add_reader(way.src.fileno(), self._on_readable, way)
            else:
                self._loop.remove_reader(way.src.fileno())
            way.reading = read
        if write != way.writing:
            if write:
                self._loop.add_writer(way.dst.fileno(), self._on_writable, way)
            else:
                self._loop.remove_writer(way.dst.fileno())
            way.writing = write

    def _check_idle(self) -> None:
        idle = time.monotonic() - self._last_activity
        if idle >= self._idle_timeout:
            self._finish(notify=True, hard=True)
        else:
            self._idle_timer = self._loop.call_later(self._idle_timeout - idle, self._check_idle)

    # -- the end -----------------------------------------------------------------------------

    def _finish(self, *, notify: bool, hard: bool) -> None:
        if self.finished:
            return
        self.finished = True
        _live.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for way in self._ways:
            self._watch(way, read=False, write=False)
            _pipes.give(way)
        for sock in (self._client, self._server):
            if hard:
                # mitmproxy still holds its own descriptor of each socket: shutdown reaches the
                # peer now, whenever that one is closed.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if notify:
            self._on_end()


# -- the mitmproxy side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """How raw tunnels are relayed: the mode, and the runtime's map from a client connection
    id to its mitmproxy connection handler (the handover needs its transports)."""

    mode: RelayMode
    handlers: Callable[[str], ConnectionHandler | None]


class MeteredTunnel(layers.TCPLayer):
    """A raw TCP tunnel relayed by mitmproxy (no interception, no per-chunk hooks) that counts
    bytes each way."""

    def __init__(self, context: Context, meter: Meter) -> None:
        super().__init__(context, ignore=True)
        self._meter = meter

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Not a generator itself: it hands back TCPLayer's, so no extra frame per chunk.
        if isinstance(event, events.DataReceived):
            if event.connection is self.context.client:
                self._meter.sent += len(event.data)
            else:
                self._meter.received += len(event.data)
        relay: layer.CommandGenerator[None] = super().relay_messages(event)  # no call per chunk
        return relay


class RelayedTunnel(MeteredTunnel):
    """A raw tunnel whose sockets are taken out of mitmproxy once the upstream is connected.

    Until the relay runs, bytes mitmproxy had already read (the ClientHello it peeked at, a
    greeting from the server) arrive here as events and are written first. Afterwards the only
    events are mitmproxy closing a connection (revocation, shutdown): that stops the relay."""

    def __init__(self, context: Context, meter: Meter, settings: RelaySettings) -> None:
        super().__init__(context, meter)
        self._settings = settings
        self._pending: tuple[list[bytes], list[bytes]] = ([], [])
        self._relay: Relay | None = None
        self._aborted = False
        self._handover: asyncio.Task[None] | None = None

    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().start(event)  # dials the upstream if it is not connected yet
        if self._handle_event != self.relay_messages:
            return  # the upstream could not be reached: the client is closed
        handler = self._settings.handlers(self.context.client.id)
        ios = _stream_ios(handler, self.context.client, self.context.server)
        if handler is None or ios is None:
            return  # not plain TCP streams (never so for CONNECT, SOCKS5, transparent)
        self._handle_event = self.handing_over  # type: ignore[method-assign]
        self._handover = asyncio.ensure_future(self._hand_over(handler))
        self._handover.add_done_callback(functools.partial(_handover_failed, handler))

    _handle_event = start

    def handing_over(self, event: events.Event) -> layer.CommandGenerator[None]:
        if not isinstance(event, events.ConnectionEvent):
            return
        from_client = event.connection is self.context.client
        if isinstance(event, events.DataReceived):
            if self._relay is not None:  # mitmproxy read it after all (a server that speaks
                # first, e.g. SSH): the relay writes it before anything it reads itself
                self._relay.inject(from_client, event.data)
            else:
                self._pending[0 if from_client else 1].append(event.data)
            return
        # A peer's FIN before the handover needs nothing: the relay reads it again itself.
        if event.connection.state is not ConnectionState.CLOSED:
            return
        # mitmproxy closed a connection (revocation, lifetime, shutdown): the tunnel ends.
        self._aborted = True
        if self._relay is not None:
            self._relay.abort()
        self._handle_event = self.done  # type: ignore[method-assign]
        for conn in (self.context.server, self.context.client):
            if conn.state is not ConnectionState.CLOSED:
                yield commands.CloseConnection(conn)

    async def _hand_over(self, handler: ConnectionHandler) -> None:
        """Wait until mitmproxy holds no unread byte of either connection, then take both
        sockets over (see docs/relay.md: pause reading, drain the StreamReaders, dup)."""
        client, server = self.context.client, self.context.server
        deadline = time.monotonic() + _HANDOVER_WAIT
        while True:
            # First out of the event that started us: mitmproxy runs tasks eagerly, and the
            # bytes it read before this layer was chosen are replayed to us after Start.
            await asyncio.sleep(0)
            if self._aborted:
                return
            ios = _stream_ios(handler, client, server)
            if ios is None:
                return  # mitmproxy closed the tunnel meanwhile
            if all(_quiet(conn, io) for conn, io in zip((client, server), ios, strict=True)):
                break
            if time.monotonic() > deadline:
                handler.close_connection(client)
                return
        watchdog = handler.timeout_watchdog
        # The relay keeps its own idle timeout; mitmproxy's, which sees no events now, must
        # not end a busy tunnel (disarm stops new waits; `inf` defuses one already sleeping).
        disarmed = contextlib.ExitStack()
        disarmed.enter_context(watchdog.disarm())
        watchdog.last_activity = float("inf")

        def on_end() -> None:
            disarmed.close()
            for conn in (server, client):
                if conn in handler.transports and conn.state is not ConnectionState.CLOSED:
                    handler.close_connection(conn)

        sockets: list[socket.socket] = []
        try:
            sockets.extend(_dup_socket(io) for io in ios)
        except OSError:  # out of descriptors: the tunnel ends as any failed connection would
            for sock in sockets:
                sock.close()
            on_end()
            return
        relay = Relay(
            sockets[0],
            sockets[1],
            self._meter,
            splice=self._settings.mode is RelayMode.SPLICE,
            idle_timeout=float(self.context.options.tcp_timeout),
            on_end=on_end,
        )
        self._relay = relay
        relay.start(b"".join(self._pending[0]), b"".join(self._pending[1]))
        self._pending = ([], [])
        self._handover = None


def _handover_failed(handler: ConnectionHandler, task: asyncio.Task[None]) -> None:
    """A handover that raised leaves a tunnel nobody reads: log it and close the client."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    log.error("egress.relay.handover_failed", error=repr(error))
    if handler.client in handler.transports:
        handler.close_connection(handler.client)


def _stream_ios(
    handler: ConnectionHandler | None, client: connection.Client, server: connection.Server
) -> tuple[ConnectionIO, ConnectionIO] | None:
    """Both connections' asyncio streams, if both are open TCP streams in `handler`."""
    if handler is None:
        return None
    ios = handler.transports.get(client), handler.transports.get(server)
    for io in ios:
        if io is None or not isinstance(io.reader, asyncio.StreamReader):
            return None
        if not isinstance(io.writer, asyncio.StreamWriter):
            return None
    assert ios[0] is not None and ios[1] is not None
    return ios[0], ios[1]


def _quiet(conn: connection.Connection, io: ConnectionIO) -> bool:
    """Reading paused, and nothing read but not yet handed to the layer, nothing unsent."""
    assert isinstance(io.reader, asyncio.StreamReader)
    assert isinstance(io.writer, asyncio.StreamWriter)
    transport = io.writer.transport
    assert isinstance(transport, asyncio.ReadTransport)
    # A StreamReader resumes reading when its buffer drains: pause again every time.
    transport.pause_reading()
    reader: Any = io.reader  # its buffer and EOF flag are internals (docs/relay.md)
    buffered = len(reader._buffer)
    # An end of stream read but not yet reported to the layer (reported: CAN_READ is gone).
    eof_unseen = reader._eof and bool(conn.state & ConnectionState.CAN_READ)
    unsent = io.writer.transport.get_write_buffer_size()
    return buffered == 0 and not eof_unseen and unsent == 0


def _dup_socket(io: ConnectionIO) -> socket.socket:
    """Our own descriptor of the connection's socket (mitmproxy closes its own later)."""
    assert isinstance(io.writer, asyncio.StreamWriter)
    fd = io.writer.get_extra_info("socket").fileno()
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    return sock
