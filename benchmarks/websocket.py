"""Plain `ws://` for the harness: a WebSocket upstream (its own process, so that it does not share
the client's interpreter) that answers `GET /ws/<bytes>/<message size>` with that many payload
bytes in binary messages and a close frame, and the client that downloads them through a proxy.

Run as `python -m benchmarks.websocket PORT`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import sys
import time

from benchmarks.procs import BenchError

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
WS_PATH = "/ws"
_OP_BINARY, _OP_CLOSE = 0x2, 0x8


def _frame(opcode: int, payload: bytes, mask: bool = False) -> bytes:
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size | (0x80 if mask else 0))
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126 | (0x80 if mask else 0), size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127 | (0x80 if mask else 0), size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))  # close frames only: tiny
    return head + key + masked


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


# --- the upstream ---------------------------------------------------------------------------


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head.split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)
        }
        target = request_line.split(" ")[1]
        path = "/" + target.split("://", 1)[1].partition("/")[2] if "://" in target else target
        parts = path.strip("/").split("/")
        if headers.get("upgrade", "").lower() != "websocket" or parts[0] != WS_PATH.strip("/"):
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        total, size = int(parts[1]), int(parts[2])
        writer.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept_key(headers['sec-websocket-key'])}\r\n\r\n"
            ).encode()
        )
        message = _frame(_OP_BINARY, b"\x5a" * size)
        sent = 0
        while sent + size <= total:
            writer.write(message)
            await writer.drain()
            sent += size
        if total > sent:
            writer.write(_frame(_OP_BINARY, b"\x5a" * (total - sent)))
        writer.write(_frame(_OP_CLOSE, struct.pack("!H", 1000)))
        await writer.drain()
        await reader.read()  # the client's close frame, then its EOF
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, KeyError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_session, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- the client -----------------------------------------------------------------------------


def _read_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise BenchError("websocket: connection closed before the close frame")
        got += n


def ws_download(
    *, connect_port: int, target: str, host: str, total: int, message_size: int
) -> float:
    """Open a plain WebSocket (`target`: absolute-form through a proxy, else origin-form), read
    `total` payload bytes in binary messages up to the close frame; returns MB/s (10^6 bytes)
    from the request to the close frame."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target}/{total}/{message_size} HTTP/1.1\r\nHost: {host}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", connect_port), timeout=30) as sock:
        started = time.perf_counter()
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)  # byte by byte: frames may follow the head at once
            if not chunk:
                raise BenchError(f"websocket: closed during the handshake: {head[:200]!r}")
            head += chunk
        status = head.split(b" ", 2)[1]
        if status != b"101":
            raise BenchError(f"websocket: answered {head.split(b'\r\n', 1)[0]!r}, not 101")
        header = bytearray(14)
        payload = bytearray(max(message_size, 1 << 16))
        received = 0
        while True:
            _read_exact(sock, memoryview(header)[:2])
            opcode, length = header[0] & 0x0F, header[1] & 0x7F
            if header[1] & 0x80:
                raise BenchError("websocket: the server's frame is masked")
            if length == 126:
                _read_exact(sock, memoryview(header)[2:4])
                length = struct.unpack("!H", header[2:4])[0]
            elif length == 127:
                _read_exact(sock, memoryview(header)[2:10])
                length = struct.unpack("!Q", header[2:10])[0]
            if length > len(payload):
                payload = bytearray(length)
            _read_exact(sock, memoryview(payload)[:length])
            if opcode == _OP_CLOSE:
                break
            received += length
        elapsed = time.perf_counter() - started
        sock.sendall(_frame(_OP_CLOSE, struct.pack("!H", 1000), mask=True))
    if received != total:
        raise BenchError(f"websocket: {received} payload bytes, expected {total}")
    return total / elapsed / 1e6


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
