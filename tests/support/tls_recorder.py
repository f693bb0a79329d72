"""A TLS upstream that records what reached it on each TCP connection: whether any byte
arrived, the server name of the ClientHello, whether the handshake completed, the request."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Arrival:
    """One TCP connection accepted by the recorder."""

    got_bytes: bool = False  # any byte arrived before the TLS handshake
    hello_seen: bool = False  # a ClientHello was parsed (its server name below)
    sni: str | None = None
    handshake_done: bool = False
    request_line: str | None = None
    closed: threading.Event = field(default_factory=threading.Event)


class TlsRecorder:
    """Listens on `host`, port 0; answers each request with 200 and the server name it saw."""

    def __init__(self, host: str, context: ssl.SSLContext) -> None:
        self.context = context
        self.context.sni_callback = self._on_hello
        self._current = threading.local()
        self.arrivals: list[Arrival] = []
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def wait_closed(self, since: int, timeout: float = 5.0) -> list[Arrival]:
        """Connections accepted after the first `since`, once every one has ended (or raise)."""
        deadline = time.monotonic() + timeout
        new = self.arrivals[since:]
        for arrival in new:
            if not arrival.closed.wait(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"upstream connection still open after {timeout}s: {arrival}")
        return new

    def _on_hello(self, sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        arrival: Arrival = self._current.arrival
        arrival.hello_seen = True
        arrival.sni = name

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            arrival = Arrival()
            self.arrivals.append(arrival)
            threading.Thread(target=self._handle, args=(conn, arrival), daemon=True).start()

    def _handle(self, conn: socket.socket, arrival: Arrival) -> None:
        self._current.arrival = arrival
        conn.settimeout(10)
        try:
            try:
                arrival.got_bytes = conn.recv(1, socket.MSG_PEEK) != b""
            except OSError:
                arrival.got_bytes = False
            if not arrival.got_bytes:
                return
            with self.context.wrap_socket(conn, server_side=True) as tls:
                arrival.handshake_done = True
                reader = tls.makefile("rb")
                arrival.request_line = reader.readline().decode("latin-1").rstrip("\r\n")
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
                body = f"hello from tls upstream {arrival.request_line} sni={arrival.sni}\n"
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
                )
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()
            arrival.closed.set()
