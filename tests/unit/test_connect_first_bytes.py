"""`egress-warden connect`: what the destination sent together with the proxy's `200` (SSH's
banner, the server speaking first) is handed on, not dropped."""

from __future__ import annotations

import io
import socket
import threading

from proxy.connectcmd import open_tunnel, relay


def test_bytes_sharing_a_read_with_the_answer_reach_stdout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def proxy() -> None:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nSSH-2.0-Test\r\n")  # one write, one read
            conn.sendall(b"more")
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(4096):
                pass

    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    sock, first = open_tunnel(f"http://127.0.0.1:{port}", "git.test", 22, timeout=5)
    assert first.startswith(b"SSH-2.0-Test\r\n")
    out = io.BytesIO()
    with sock:
        relay(sock, io.BytesIO(b""), out, first)
    assert out.getvalue() == b"SSH-2.0-Test\r\nmore"
    thread.join(5)
    listener.close()
