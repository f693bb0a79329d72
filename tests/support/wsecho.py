"""A real WebSocket upstream (wsproto over sockets, one thread per connection) and a plain
`ws://` client that goes through an HTTP proxy with an absolute-form upgrade request."""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError


@dataclass
class WsEchoServer:
    """Answers every whole message with the same payload twice (so each direction's byte count
    differs: received = 2 x sent)."""

    sock: socket.socket
    tls: ssl.SSLContext | None = None  # wss:// when set
    connections: int = 0
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve_one, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve_one(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                return
        self._session(conn)

    @staticmethod
    def _session(conn: socket.socket) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        parts: list[bytes | str] = []
        with conn:
            while True:
                data = conn.recv(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, Request):
                        conn.sendall(ws.send(AcceptConnection()))
                    elif isinstance(event, Message):
                        parts.append(event.data)
                        if event.message_finished:
                            whole = (
                                "".join(p for p in parts if isinstance(p, str))
                                if isinstance(event.data, str)
                                else b"".join(p for p in parts if isinstance(p, bytes))
                            )
                            parts.clear()
                            reply: Event = (
                                TextMessage(data=whole * 2)
                                if isinstance(whole, str)
                                else BytesMessage(data=whole * 2)
                            )
                            conn.sendall(ws.send(reply))
                    elif isinstance(event, CloseConnection):
                        # The peer may already be gone; the session ends either way.
                        with contextlib.suppress(OSError, LocalProtocolError):
                            conn.sendall(ws.send(event.response()))
                        return
                if not data:
                    return


def start_ws_echo(host: str, tls: ssl.SSLContext | None = None) -> WsEchoServer:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(64)
    server = WsEchoServer(sock, tls)
    threading.Thread(target=server.serve, daemon=True).start()
    return server


class ProxiedWsClient:
    """A WebSocket client speaking through a forward proxy. Plain `ws://`: the upgrade request
    goes in absolute form (`GET http://host:port/path`); `wss://` (`tls` given): CONNECT, TLS
    with that context, then the upgrade in origin form. Frames follow on the same connection."""

    def __init__(
        self,
        proxy: tuple[str, int],
        host: str,
        port: int,
        path: str = "/",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sock: socket.socket = socket.create_connection(proxy, timeout=10)
        target = f"http://{host}:{port}{path}"
        if tls is not None:
            self.sock.sendall(
                f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = self.sock.recv(1)
                if not chunk:
                    raise ConnectionError(f"proxy closed during CONNECT: {answer!r}")
                answer += chunk
            if answer.split(b" ", 2)[1] != b"200":
                raise ConnectionError(f"CONNECT refused: {answer!r}")
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
            target = path
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {target} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"proxy closed during the handshake: {head!r}")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.ws = Connection(ConnectionType.CLIENT)
        self._pending: list[Event] = []
        if rest:
            self.ws.receive_data(rest)

    def send(self, payload: bytes | str) -> None:
        event: Event = (
            TextMessage(data=payload) if isinstance(payload, str) else BytesMessage(data=payload)
        )
        self.sock.sendall(self.ws.send(event))

    def receive(self) -> bytes | str:
        """The next whole message."""
        parts: list[bytes | str] = []
        while True:
            for event in self.ws.events():
                if isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        if isinstance(event.data, str):
                            return "".join(p for p in parts if isinstance(p, str))
                        return b"".join(p for p in parts if isinstance(p, bytes))
                elif isinstance(event, CloseConnection):
                    raise ConnectionError(f"closed by peer: {event.code}")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection ended")
            self.ws.receive_data(data)

    def close(self) -> None:
        """A clean close handshake, then the socket is closed."""
        self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.ws.receive_data(data)
                if any(isinstance(e, CloseConnection) for e in self.ws.events()):
                    break
        finally:
            self.sock.close()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        self.sock.close()
