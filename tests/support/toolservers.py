"""Local servers that real tools talk to: a git smart-HTTP server (`git http-backend` behind a
small CGI bridge) and a package index (a directory with a PEP 503 simple page and a wheel)."""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
import subprocess
import threading
import zipfile
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class ToolServer:
    server: ThreadingHTTPServer
    paths: list[str]

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _serve(server: ThreadingHTTPServer, paths: list[str]) -> ToolServer:
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return ToolServer(server, paths)


def make_git_repo(root: Path, name: str = "demo.git") -> Path:
    """A bare repository under `root` with one commit holding README."""
    work = root / "work"
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    run = partial(subprocess.run, check=True, capture_output=True, env=env)
    run(["git", "init", "-q", "-b", "main", str(work)])
    (work / "README").write_text("served by git http-backend\n")
    run(["git", "-C", str(work), "add", "README"])
    run(
        [
            *("git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t.test"),
            *("commit", "-q", "-m", "first"),
        ]
    )
    bare = root / name
    run(["git", "clone", "-q", "--bare", str(work), str(bare)])
    return bare


def start_git_server(
    host: str, project_root: Path, ssl_context: ssl.SSLContext | None = None
) -> ToolServer:
    """`git http-backend` (smart HTTP, read-only) for the bare repositories under project_root;
    over HTTPS when an SSL context is given."""
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the CGI output's length is not known up front

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _cgi(self) -> None:
            path, _, query = self.path.partition("?")
            paths.append(path)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(project_root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_GLOBAL": "/dev/null",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_ADDR": self.client_address[0],
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            }
            out = subprocess.run(
                ["git", "http-backend"], input=body, capture_output=True, env=env, check=False
            ).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            if not _:
                head, _, payload = out.partition(b"\n\n")
            status = 200
            headers: list[tuple[str, str]] = []
            for line in head.decode("latin-1").splitlines():
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _cgi

    server = ThreadingHTTPServer((host, 0), Handler)
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    return _serve(server, paths)


def build_wheel(directory: Path, name: str = "demo_pkg", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel, written by hand (no build backend needed)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def start_package_index(host: str, root: Path, project: str = "demo-pkg") -> ToolServer:
    """A PEP 503 simple index at /simple/ offering one wheel of `project`."""
    files = root / "files"
    files.mkdir(parents=True)
    wheel = build_wheel(files, project.replace("-", "_"))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    page = root / "simple" / project
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="/files/{wheel.name}#sha256={sha}">'
        f"{wheel.name}</a></body></html>\n"
    )
    paths: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            paths.append(self.path)
            super().do_GET()

    handler = partial(Handler, directory=str(root))
    return _serve(ThreadingHTTPServer((host, 0), handler), paths)


def _npm_tarball(name: str, version: str) -> bytes:
    import io
    import json
    import tarfile

    files = {
        "package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"}),
        "package/index.js": "module.exports = 42;\n",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def start_npm_registry(host: str, name: str = "demo-npm-pkg", version: str = "1.0.0") -> ToolServer:
    """An npm registry serving one package: its packument and its tarball."""
    import json

    tarball = _npm_tarball(name, version)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    tar_path = f"/{name}/-/{name}-{version}.tgz"
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            paths.append(self.path)
            if self.path == f"/{name}":
                # The tarball URL names the registry as the client addressed it.
                base = f"http://{self.headers.get('Host', '')}"
                dist = {
                    "tarball": base + tar_path,
                    "shasum": hashlib.sha1(
                        tarball
                    ).hexdigest(),  # npm still lists it beside integrity
                    "integrity": integrity,
                }
                doc = {
                    "name": name,
                    "dist-tags": {"latest": version},
                    "versions": {version: {"name": name, "version": version, "dist": dist}},
                }
                body, kind = json.dumps(doc).encode(), "application/json"
            elif self.path == tar_path:
                body, kind = tarball, "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return _serve(ThreadingHTTPServer((host, 0), Handler), paths)
