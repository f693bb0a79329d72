"""The control-API CLI commands against a real (tiny, canned) control API served by uvicorn."""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from proxy.control.client import (
    EXIT_API,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ControlClient,
    ControlError,
    add_client_commands,
    format_duration,
)

TOKEN = "s3cret-token"
NOW = time.time()


def make_pending(now: float) -> list[dict[str, Any]]:
    """Canned pending items, timed relative to `now` (the moment the API answers)."""
    return [
        {
            "id": "1a2b3c",
            "host": "api.unknown.test",
            "port": 443,
            "scheme": "https",
            "method": "CONNECT",
            "agent": "claude-1",
            "session": "s-1",
            "first_seen": now - 125,
            "last_seen": now - 5,
            "count": 4,
            "expires_at": now + 3600,
            "review": "human",
            "waiting": 3,
        },
        {
            "id": "4d5e6f",
            "host": "::1",
            "port": 8443,
            "scheme": "https",
            "method": "GET",
            "agent": None,
            "session": None,
            "first_seen": now - 10,
            "last_seen": now - 10,
            "count": 1,
            "expires_at": now - 1,
            "review": "human",
            "waiting": 0,
        },
    ]


GRANT: dict[str, Any] = {
    "id": "g-77",
    "pattern": "api.unknown.test:443",
    "action": "allow",
    "scope": "always",
    "agent": None,
    "session": None,
    "created_by": "admin",
    "note": "needed for tests",
    "created_at": NOW - 60,
    "expires_at": None,
}

DECISIONS: list[dict[str, Any]] = [
    {
        "request_id": f"r-{i}",
        "at": NOW - i,
        "decision": "deny" if i % 2 else "allow",
        "reason": "rule" if i % 2 else "policy_allow",
        "host": f"host{i}.test",
        "port": 443,
        "method": "CONNECT",
        "transport": "https_connect",
        "agent": "claude-1",
        "session": None,
        "rule": "**.pastebin.com" if i % 2 else "github.com",
        "source": "policies/default.yaml:12",
        "client_address": "127.0.0.1",
        "peer_address": "140.82.112.3",
        "mode": "enforce",
        "path": None,
        "pending_id": None,
    }
    for i in range(30)
]


@dataclass
class FakeApi:
    """A running fake control API and what it has seen."""

    url: str
    seen: list[tuple[str, str, Any]] = field(default_factory=list)


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def build_app(seen: list[tuple[str, str, Any]]) -> FastAPI:
    """The control API contract with canned data; checks the bearer token."""
    app = FastAPI()
    resolved: set[str] = set()

    @app.middleware("http")
    async def check_token(request: Request, call_next: Any) -> Any:
        if request.url.path == "/healthz":
            return await call_next(request)
        auth = request.headers.get("authorization", "")
        if not auth:
            return _error(401, "unauthorized", "missing bearer token")
        if auth != f"Bearer {TOKEN}":
            return _error(403, "forbidden", "wrong bearer token")
        body = await request.body()
        target = request.scope["raw_path"].decode()  # as sent, before percent-decoding
        if request.url.query:
            target += "?" + request.url.query
        seen.append((request.method, target, json.loads(body) if body else None))
        return await call_next(request)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/pending")
    async def pending() -> list[dict[str, Any]]:
        return [p for p in make_pending(time.time()) if p["id"] not in resolved]

    async def resolve(item_id: str, request: Request, resolution: str) -> JSONResponse:
        body = await request.json()
        if item_id in resolved:
            return _error(409, "conflict", f"pending item {item_id} was already {resolution}")
        item = next((p for p in make_pending(time.time()) if p["id"] == item_id), None)
        if item is None:
            return _error(404, "not_found", f"no pending item {item_id}")
        if body.get("scope") not in ("once", "session", "always"):
            return _error(422, "invalid", "scope must be once, session or always")
        grant = None
        if resolution == "approved" and body["scope"] != "once":
            grant = {**GRANT, "scope": body["scope"], "note": body.get("note") or ""}
            if body.get("for", "agent") == "agent":
                grant["agent"] = item["agent"]
        return JSONResponse(
            {
                "id": item_id,
                "resolution": resolution,
                "scope": body["scope"],
                "for": body.get("for", "agent"),
                "released": item["waiting"],
                "grant": grant,
            }
        )

    @app.post("/v1/pending/{item_id}/approve")
    async def approve(item_id: str, request: Request) -> JSONResponse:
        return await resolve(item_id, request, "approved")

    @app.post("/v1/pending/{item_id}/deny")
    async def deny(item_id: str, request: Request) -> JSONResponse:
        return await resolve(item_id, request, "denied")

    @app.get("/v1/grants")
    async def grants() -> list[dict[str, Any]]:
        return [GRANT]

    @app.delete("/v1/grants/{grant_id}")
    async def revoke(grant_id: str) -> JSONResponse:
        if grant_id != GRANT["id"]:
            return _error(404, "not_found", f"no grant {grant_id}")
        return JSONResponse({"id": grant_id, "revoked": True})

    @app.get("/v1/decisions")
    async def decisions(
        limit: int = 50, host: str | None = None, decision: str | None = None
    ) -> list[dict[str, Any]]:
        rows = [
            d
            for d in DECISIONS
            if (host is None or d["host"] == host)
            and (decision is None or d["decision"] == decision)
        ]
        return rows[:limit]

    @app.post("/v1/boom")
    async def boom() -> JSONResponse:
        return _error(422, "invalid", "the body is not valid")

    # One item is already resolved, so 409 is exercised without order-dependent tests.
    resolved.add("already-done")
    return app


@pytest.fixture(scope="module")
def api_server() -> Iterator[FakeApi]:
    """Serve the fake API with uvicorn in a background thread on 127.0.0.1:<free port>."""
    seen: list[tuple[str, str, Any]] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(seen), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("fake control API did not start")
        time.sleep(0.02)
    try:
        yield FakeApi(url=f"http://127.0.0.1:{port}", seen=seen)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def api(api_server: FakeApi) -> FakeApi:
    api_server.seen.clear()
    return api_server


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No token or URL from the developer's environment or a real `.state/` leaks in."""
    monkeypatch.delenv("EGRESS_WARDEN_CONTROL_TOKEN", raising=False)
    monkeypatch.delenv("EGRESS_WARDEN_CONTROL_URL", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused, without races."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def cells(line: str) -> list[str]:
    """Split a table row into its cells (columns are separated by two or more spaces)."""
    return re.split(r"\s{2,}", line.strip())


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="egress-warden")
    sub = parser.add_subparsers()
    add_client_commands(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def with_token(api: FakeApi, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setenv("EGRESS_WARDEN_CONTROL_TOKEN", TOKEN)
    return run_cli([*argv, "--control", api.url])


# -- tables and JSON ---------------------------------------------------------------------------


def test_pending_table(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "pending") == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    header = [
        "ID",
        "AGENT",
        "SESSION",
        "DESTINATION",
        "METHOD",
        "COUNT",
        "WAITING",
        "AGE",
        "EXPIRES IN",
    ]
    assert cells(lines[0]) == header
    first = cells(lines[1])
    assert first[:7] == ["1a2b3c", "claude-1", "s-1", "api.unknown.test:443", "CONNECT", "4", "3"]
    assert first[7] in ("2m05s", "2m06s")
    assert first[8] == "1h00m" or first[8].startswith("59m")
    assert cells(lines[2]) == [
        "4d5e6f",
        "(anonymous)",
        "-",
        "[::1]:8443",
        "GET",
        "1",
        "0",
        "10s",
        "expired",
    ]
    # Columns are aligned: every row starts its DESTINATION at the same offset.
    col = lines[0].index("DESTINATION")
    assert lines[1][col:].startswith("api.unknown.test:443")
    assert lines[2][col:].startswith("[::1]:8443")


def test_pending_json(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "pending", "--json") == 0
    out = capsys.readouterr().out
    answer = json.loads(out)
    expected = make_pending(0.0)
    assert [a["id"] for a in answer] == [e["id"] for e in expected]
    untimed = ("first_seen", "last_seen", "expires_at")
    for got, want in zip(answer, expected, strict=True):
        assert {k: v for k, v in got.items() if k not in untimed} == {
            k: v for k, v in want.items() if k not in untimed
        }
        assert got.keys() == want.keys()
    assert out.startswith("[\n  {")  # indent 2


def test_pending_empty(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ControlClient, "pending", lambda self: [])
    assert with_token(api, monkeypatch, "pending") == 0
    assert capsys.readouterr().out.strip() == "no pending requests"


def test_grants_list_default_and_explicit(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "grants") == 0
    bare = capsys.readouterr().out
    assert with_token(api, monkeypatch, "grants", "list") == 0
    explicit = capsys.readouterr().out
    assert bare == explicit
    header, row = bare.splitlines()
    assert header.split()[:4] == ["ID", "ACTION", "PATTERN", "SCOPE"]
    assert row.split()[:4] == ["g-77", "allow", "api.unknown.test:443", "always"]
    assert "all agents" in row and "admin" in row and "never" in row


def test_grants_json_flag_before_nested_command(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EGRESS_WARDEN_CONTROL_TOKEN", TOKEN)
    assert run_cli(["grants", "--control", api.url, "--json", "list"]) == 0
    assert json.loads(capsys.readouterr().out) == [GRANT]


def test_grants_revoke(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "grants", "revoke", "g-77") == 0
    assert capsys.readouterr().out.strip() == "revoked grant g-77"
    assert api.seen[-1][:2] == ("DELETE", "/v1/grants/g-77")


def test_grants_revoke_unknown(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "grants", "revoke", "nope") == EXIT_API
    out, err = capsys.readouterr()
    assert out == ""
    assert "no grant with id nope" in err


def test_decisions_table_and_filters(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "decisions") == 0
    lines = capsys.readouterr().out.splitlines()
    header = ["TIME", "DECISION", "REASON", "AGENT", "DESTINATION", "RULE", "SOURCE"]
    assert lines[0].split() == header
    assert len(lines) == 1 + 20  # default --limit 20
    expected_time = time.strftime("%H:%M:%S", time.localtime(DECISIONS[0]["at"]))
    assert lines[1].split() == [
        expected_time,
        "allow",
        "policy_allow",
        "claude-1",
        "host0.test:443",
        "github.com",
        "policies/default.yaml:12",
    ]
    assert lines[2].split()[1:6] == [
        "deny",
        "rule",
        "claude-1",
        "host1.test:443",
        "**.pastebin.com",
    ]

    assert with_token(api, monkeypatch, "decisions", "--limit", "3", "--decision", "deny") == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[4] for r in rows] == ["host1.test:443", "host3.test:443", "host5.test:443"]
    assert "limit=3" in api.seen[-1][1] and "decision=deny" in api.seen[-1][1]

    assert with_token(api, monkeypatch, "decisions", "--host", "host7.test", "--json") == 0
    assert json.loads(capsys.readouterr().out) == [DECISIONS[7]]


def test_decisions_empty(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "decisions", "--host", "nothing.test") == 0
    assert capsys.readouterr().out.strip() == "no decisions recorded"


def test_decisions_limit_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli(["decisions", "--limit", "0"])
    assert exc.value.code == 2


# -- approve / deny ----------------------------------------------------------------------------


def test_approve_message_and_body(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = with_token(
        api, monkeypatch, "approve", "1a2b3c", "--scope", "always", "--for", "all", "--note", "ok"
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "approved 1a2b3c api.unknown.test:443 (scope always, for all agents)",
        "released 3 waiting request(s)",
        "this is open to every caller: all agents and anonymous clients alike",
        "scope always: until the grant is revoked (egress-warden grants revoke ID)",
        "grant g-77: allow api.unknown.test:443 (always, for all agents)",
    ]
    method, url, body = api.seen[-1]
    assert (method, url) == ("POST", "/v1/pending/1a2b3c/approve")
    assert body == {"scope": "always", "for": "all", "note": "ok"}


def test_approve_defaults(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "approve", "1a2b3c") == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "approved 1a2b3c api.unknown.test:443 (scope once, for agent claude-1)",
        "released 3 waiting request(s)",
        "scope once: only the request(s) waiting now; the next request is held again",
    ]
    assert api.seen[-1][2] == {"scope": "once", "note": ""}


def test_deny_message(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "deny", "1a2b3c", "--scope", "session") == 0
    out = capsys.readouterr().out.strip()
    assert out.splitlines()[:2] == [
        "denied 1a2b3c api.unknown.test:443 (scope session, for agent claude-1, session s-1)",
        "answered 3 waiting request(s) with 403",
    ]


def test_approve_anonymous_item_says_it_is_for_all_agents(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "approve", "4d5e6f", "--for", "all") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "approved 4d5e6f [::1]:8443 (scope once, for all agents)"
    assert lines[2] == (
        "this is open to every caller: all agents and anonymous clients alike "
        "(it was asked for by an anonymous caller, so it cannot be limited to one)"
    )


def test_decisions_filters_by_agent_reason_and_time(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["decisions", "--agent", "claude-1", "--reason", "deny_rule", "--since", "1h"]
    assert with_token(api, monkeypatch, *args) == 0
    query = api.seen[-1][1]
    assert "agent=claude-1" in query and "reason=deny_rule" in query and "since=1h" in query
    with pytest.raises(SystemExit):
        run_cli(["decisions", "--since", "yesterday"])
    assert "invalid duration" in capsys.readouterr().err


def test_approve_json(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "approve", "4d5e6f", "--json") == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["resolution"] == "approved" and answer["released"] == 0
    assert answer["grant"] is None


def test_approve_unknown_id(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "approve", "zzz") == EXIT_API
    out, err = capsys.readouterr()
    assert out == ""
    assert "no pending item with id zzz" in err


def test_approve_already_resolved(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "deny", "already-done") == EXIT_API
    err = capsys.readouterr().err
    assert "already resolved" in err and "was already denied" in err


def test_id_is_one_path_segment(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert with_token(api, monkeypatch, "approve", "../../grants") == EXIT_API
    assert api.seen[-1][1] == "/v1/pending/..%2F..%2Fgrants/approve"


def test_other_api_error_shows_detail(api: FakeApi) -> None:
    with ControlClient(api.url, TOKEN) as client, pytest.raises(ControlError) as exc:
        client._request("POST", "/v1/boom")
    assert exc.value.exit_code == EXIT_API
    assert "422" in exc.value.message and "the body is not valid" in exc.value.message


# -- auth and reachability ---------------------------------------------------------------------


def test_wrong_token(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EGRESS_WARDEN_CONTROL_TOKEN", "not-the-token")
    assert run_cli(["pending", "--control", api.url]) == EXIT_API
    out, err = capsys.readouterr()
    assert out == ""
    assert "the control API rejected the token (403)" in err
    assert "EGRESS_WARDEN_CONTROL_TOKEN" in err and "--token-file" in err


def test_unreachable_instance(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EGRESS_WARDEN_CONTROL_TOKEN", TOKEN)
    url = f"http://127.0.0.1:{closed_port}"
    assert run_cli(["pending", "--control", url]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert f"cannot reach egress-warden control API at {url}: connection refused" in err
    assert "egress-warden run" in err and "--control URL" in err


def test_control_url_from_env_and_host_port_form(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EGRESS_WARDEN_CONTROL_TOKEN", TOKEN)
    monkeypatch.setenv("EGRESS_WARDEN_CONTROL_URL", api.url.removeprefix("http://") + "/")
    assert run_cli(["grants"]) == 0
    assert "g-77" in capsys.readouterr().out


def test_token_from_token_file(
    api: FakeApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token_file = tmp_path / "tok"
    token_file.write_text(TOKEN + "\n")
    # --token-file wins over a wrong token in the environment.
    monkeypatch.setenv("EGRESS_WARDEN_CONTROL_TOKEN", "wrong")
    assert run_cli(["pending", "--control", api.url, "--token-file", str(token_file)]) == 0
    assert "1a2b3c" in capsys.readouterr().out


def test_token_file_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert run_cli(["pending", "--token-file", str(missing)]) == EXIT_USAGE
    assert f"cannot read token file {missing}" in capsys.readouterr().err


def test_token_from_env(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A state-dir token exists too, but the environment wins.
    Path(".state").mkdir()
    Path(".state/control-token").write_text("wrong\n")
    monkeypatch.setenv("EGRESS_WARDEN_CONTROL_TOKEN", TOKEN)
    assert run_cli(["pending", "--control", api.url]) == 0
    assert "1a2b3c" in capsys.readouterr().out


def test_token_from_default_state_dir(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    Path(".state").mkdir()
    Path(".state/control-token").write_text(TOKEN + "\n")
    assert run_cli(["pending", "--control", api.url]) == 0
    assert "1a2b3c" in capsys.readouterr().out


def test_token_from_explicit_state_dir(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "elsewhere"
    state.mkdir()
    (state / "control-token").write_text(TOKEN)
    assert run_cli(["grants", "list", "--control", api.url, "--state-dir", str(state)]) == 0
    assert "g-77" in capsys.readouterr().out


def test_no_token_anywhere(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["pending"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no control API token" in err
    assert "EGRESS_WARDEN_CONTROL_TOKEN" in err and "--token-file" in err


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 42, 307, 3900, 2 * 86400 + 3 * 3600)] == [
        "0s",
        "42s",
        "5m07s",
        "1h05m",
        "2d03h",
    ]
