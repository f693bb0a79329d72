"""Local review services for tests: a webhook reviewer and an OpenAI-compatible chat-completions
server. Both answer by the destination's first label, so one server covers every case:

  approve.*  deny.*  escalate.*   a valid answer with that outcome
  slow.*     answers after `slow` seconds (past the reviewer's timeout)
  garbage.*  a body that is not JSON
  schema.*   JSON that does not fit the answer schema
  error.*    HTTP 500
  refuse.*   (LLM only) a refusal instead of content
  once.*     (webhook only) approve, asking for scope `once`
anything else escalates.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class ReviewServer:
    server: ThreadingHTTPServer
    slow: float = 3.0
    received: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _answer(host: str, reviewer: str) -> tuple[int, Any]:
    kind = host.split(".", 1)[0]
    if kind in ("approve", "deny", "escalate"):
        return 200, {"outcome": kind, "rationale": f"{reviewer} says {kind} for {host}"}
    if kind == "once":
        return 200, {"outcome": "approve", "rationale": "only once", "scope": "once"}
    if kind == "garbage":
        return 200, "<html>not json"
    if kind == "schema":
        return 200, {"outcome": "yes please", "why": 42}
    if kind == "error":
        return 500, {"error": "boom"}
    return 200, {"outcome": "escalate", "rationale": f"{reviewer} is unsure"}


def _start(handler: type[BaseHTTPRequestHandler], box: list[ReviewServer]) -> ReviewServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    review = ReviewServer(server)
    box.append(review)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return review


class _Base(BaseHTTPRequestHandler):
    box: list[ReviewServer]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _send(self, status: int, body: Any) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):  # the reviewer gave up (timeout)
            self.wfile.write(data)


def start_webhook() -> ReviewServer:
    """A webhook reviewer on 127.0.0.1 (see the module docstring)."""
    box: list[ReviewServer] = []

    class Handler(_Base):
        def do_POST(self) -> None:
            body = self._json_body()
            server = self.box[0]
            server.received.append({"body": body, "headers": dict(self.headers.items())})
            host = body["review"]["host"]
            if host.startswith("slow."):
                time.sleep(server.slow)
            self._send(*_answer(host, "webhook"))

    Handler.box = box
    return _start(Handler, box)


def start_chat_completions() -> ReviewServer:
    """An OpenAI-compatible `POST /v1/chat/completions` on 127.0.0.1."""
    box: list[ReviewServer] = []

    class Handler(_Base):
        def do_POST(self) -> None:
            body = self._json_body()
            server = self.box[0]
            server.received.append({"body": body, "headers": dict(self.headers.items())})
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": "not found"}})
                return
            user = json.loads(body["messages"][-1]["content"])
            host = user["review_request"]["host"]
            if host.startswith("slow."):
                time.sleep(server.slow)
            status, answer = _answer(host, "llm")
            if status != 200:
                self._send(status, {"error": {"message": "boom", "type": "server_error"}})
                return
            message: dict[str, Any] = {"role": "assistant", "content": None}
            if host.startswith("refuse."):
                message["refusal"] = "I can't help with that."
            else:
                message["content"] = answer if isinstance(answer, str) else json.dumps(answer)
            self._send(
                200,
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "test"),
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                },
            )

    Handler.box = box
    return _start(Handler, box)
