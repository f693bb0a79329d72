"""Unit tests for the control API's door (proxy.control.access, proxy.control.guard) and the
role check on grants that open the network guard (proxy.control.app)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from proxy.control.access import (
    AccessDenied,
    BootstrapToken,
    Caller,
    Role,
    approver_label,
    authenticate,
)
from proxy.control.app import ControlContext, create_app
from proxy.control.guard import MAX_BODY_BYTES, MAX_HEADER_BYTES, ControlGuard, caller_of

TOKEN = "unit-token-0123456789"
Message = dict[str, Any]


# -- access -------------------------------------------------------------------------------------


def test_roles_include_the_ones_below() -> None:
    assert Role.ADMIN.allows(Role.APPROVER) and Role.ADMIN.allows(Role.VIEWER)
    assert Role.APPROVER.allows(Role.VIEWER) and not Role.APPROVER.allows(Role.ADMIN)
    assert not Role.VIEWER.allows(Role.APPROVER)


def test_bootstrap_token_is_an_admin() -> None:
    verify = BootstrapToken(TOKEN)
    assert verify(TOKEN.encode(), None) == Caller("admin", Role.ADMIN)
    assert verify(TOKEN.encode(), "alice") == Caller("alice", Role.ADMIN)
    for wrong in (b"", b"x", TOKEN.encode() + b"x", TOKEN.encode()[:-1], TOKEN.upper().encode()):
        assert verify(wrong, None) is None


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        (b"alice@example.test", "alice@example.test"),
        (b"  bob  ", "bob"),
        (b"", None),
        (b"   ", None),
        (b"policy", None),  # the proxy's own name for rule changes
        (b"Policy", None),
        (b"<script>", "%3Cscript%3E"),
        (b'a"b', "a%22b"),
        ("caf\u00e9".encode(), "caf%C3%A9"),
        (b"\x1b[31mred", "%1B[31mred".replace("[", "%5B")),
        (b"a" * 100, "a" * 64),
        (b"a" * 62 + b"<", "a" * 62),  # an escape is never cut in half
    ],
)
def test_approver_label_is_escaped_and_bounded(raw: bytes, label: str | None) -> None:
    assert approver_label(raw) == label


def _headers(**named: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in named.items()]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([], 401),
        (_headers(authorization=""), 401),
        (_headers(authorization="Bearer"), 401),
        (_headers(authorization="Bearer   "), 401),
        (_headers(authorization=f"Basic {TOKEN}"), 401),
        (_headers(authorization=f"Token {TOKEN}"), 401),
        (_headers(authorization="Bearer wrong"), 403),
        ([(b"authorization", b"Bearer x"), (b"authorization", f"Bearer {TOKEN}".encode())], 401),
    ],
)
def test_authenticate_refuses(headers: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(AccessDenied) as denied:
        authenticate(headers, BootstrapToken(TOKEN))
    assert denied.value.status == status


def test_authenticate_names_the_caller() -> None:
    verify = BootstrapToken(TOKEN)
    assert authenticate(_headers(authorization=f"bearer {TOKEN}"), verify) == Caller(
        "admin", Role.ADMIN
    )
    headers = _headers(authorization=f"Bearer {TOKEN}", x_egress_warden_approver="carol")
    assert authenticate(headers, verify) == Caller("carol", Role.ADMIN)


# -- the guard, as plain ASGI -------------------------------------------------------------------


class RecordingApp:
    """Reads the whole body and answers 200; records what it saw."""

    def __init__(self) -> None:
        self.called = False
        self.body = b""
        self.saw_disconnect = False
        self.caller: Caller | None = None

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        self.called = True
        self.caller = caller_of(scope)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.saw_disconnect = True
                break
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _run(
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    path: str = "/v1/grants",
) -> tuple[RecordingApp, list[Message], int]:
    """Call the guard; return the app, what was sent, and how many chunks were received."""
    app = RecordingApp()
    guard = ControlGuard(app, verify=BootstrapToken(TOKEN))
    scope = {"type": "http", "path": path, "method": "POST", "headers": headers, "state": {}}
    pending = list(chunks)
    taken = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal taken
        if not pending:
            return {"type": "http.disconnect"}
        taken += 1
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    return app, sent, taken


def _status(sent: list[Message]) -> tuple[int, dict[str, str], dict[str, Any]]:
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], headers, json.loads(body) if start["status"] != 200 else {}


AUTH = (b"authorization", f"Bearer {TOKEN}".encode())


def test_no_token_is_answered_without_reading_the_body() -> None:
    app, sent, taken = _run([(b"content-length", b"10000000")], [b"x" * 1000] * 5)
    status, headers, body = _status(sent)
    assert (status, body["error"]) == (401, "unauthorized")
    assert headers["www-authenticate"] == "Bearer"
    assert headers["connection"] == "close"
    assert not app.called
    assert taken == 0


def test_wrong_token_is_answered_without_reading_the_body() -> None:
    app, sent, taken = _run([(b"authorization", b"Bearer nope")], [b"{}"])
    assert _status(sent)[0] == 403
    assert not app.called and taken == 0


def test_public_path_needs_no_token() -> None:
    app, sent, _ = _run([], [b""], path="/healthz")
    assert _status(sent)[0] == 200
    assert app.called and app.caller is None


def test_the_caller_is_left_for_the_routes() -> None:
    app, sent, _ = _run([AUTH, (b"x-egress-warden-approver", b"dave")], [b"{}"])
    assert _status(sent)[0] == 200
    assert app.caller == Caller("dave", Role.ADMIN)
    assert app.body == b"{}"


def test_declared_oversized_body_is_413_before_the_app() -> None:
    app, sent, taken = _run([AUTH, (b"content-length", str(MAX_BODY_BYTES + 1).encode())], [b""])
    status, headers, body = _status(sent)
    assert (status, body["error"]) == (413, "too_large")
    assert headers["connection"] == "close"
    assert not app.called and taken == 0


def test_malformed_content_length_is_400() -> None:
    app, sent, _ = _run([AUTH, (b"content-length", b"12x")], [b""])
    assert _status(sent)[0] == 400
    assert not app.called


def test_streamed_body_past_the_cap_is_413_and_the_app_reads_no_more() -> None:
    chunks = [b"x" * 10_000] * 20  # 200 kB, no declared length
    app, sent, taken = _run([AUTH], chunks)
    status, _, body = _status(sent)
    assert (status, body["error"]) == (413, "too_large")
    assert app.saw_disconnect
    assert len(app.body) <= MAX_BODY_BYTES
    assert taken == MAX_BODY_BYTES // 10_000 + 1
    assert len(sent) == 2  # the app's own answer after the cut is dropped


def test_streamed_body_up_to_the_cap_passes() -> None:
    chunks = [b"x" * (MAX_BODY_BYTES // 4)] * 4
    app, sent, _ = _run([AUTH], chunks)
    assert _status(sent)[0] == 200
    assert len(app.body) == MAX_BODY_BYTES


def test_oversized_headers_are_431() -> None:
    app, sent, _ = _run([AUTH, (b"x-big", b"a" * MAX_HEADER_BYTES)], [b""])
    assert _status(sent)[0] == 431
    assert not app.called


# -- the role check on guarded grants, through the app --------------------------------------------


class _Approvals:
    def __init__(self) -> None:
        self.added: list[Any] = []

    async def add_grant(self, grant: Any) -> None:
        self.added.append(grant)


def _post_grants(role: Role, *bodies: dict[str, Any]) -> tuple[list[httpx.Response], _Approvals]:
    """POST each body to /v1/grants of a control app whose token holder has `role`."""
    approvals = _Approvals()

    async def rules_changed() -> int:
        return 0

    def verify(token: bytes, label: str | None) -> Caller | None:
        return Caller("erin", role) if token == TOKEN.encode() else None

    ctx = ControlContext(
        token=TOKEN,
        is_ready=lambda: True,
        policy=None,  # type: ignore[arg-type]
        approvals=approvals,  # type: ignore[arg-type]
        grants=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        audit=None,  # type: ignore[arg-type]
        bus=None,  # type: ignore[arg-type]
        reload=None,  # type: ignore[arg-type]
        check=None,  # type: ignore[arg-type]
        rules_changed=rules_changed,
        verify=verify,
    )

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(ctx))
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://control.test",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as client:
            return [await client.post("/v1/grants", json=body) for body in bodies]

    return asyncio.run(post_all()), approvals


@pytest.mark.parametrize("role", [Role.VIEWER, Role.APPROVER])
def test_guarded_grant_needs_the_admin_role(role: Role) -> None:
    (guarded, plain), approvals = _post_grants(
        role, {"pattern": "127.0.0.1", "private": True}, {"pattern": "grants.example"}
    )
    assert guarded.status_code == 403
    assert guarded.json()["error"] == "admin_role_required"
    # A grant that opens nothing guarded is not the admin's alone; a viewer decides nothing.
    if role is Role.VIEWER:
        assert plain.status_code == 403
        assert plain.json()["error"] == "approver_role_required"
        assert approvals.added == []
        return
    assert plain.status_code == 201
    assert plain.json()["created_by"] == "erin"
    assert [g.pattern for g in approvals.added] == ["grants.example"]


def test_guarded_grant_by_an_admin() -> None:
    (unflagged, flagged), approvals = _post_grants(
        Role.ADMIN, {"pattern": "127.0.0.1"}, {"pattern": "127.0.0.1", "private": True}
    )
    assert unflagged.status_code == 422
    assert unflagged.json()["error"] == "private_grant_needs_flag"
    assert flagged.status_code == 201
    assert [g.pattern for g in approvals.added] == ["127.0.0.1"]
