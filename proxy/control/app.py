"""FastAPI application for the control listener (SPEC section 5)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy import __version__
from proxy.approvals import (
    ApprovalError,
    ApprovalErrorCode,
    ApprovalQueue,
    Outcome,
    with_review_trails,
)
from proxy.audit import AuditWriter
from proxy.control.access import (
    AccessDenied,
    BootstrapToken,
    Caller,
    Role,
    TokenVerifier,
    authenticate,
)
from proxy.control.console import add_console_routes
from proxy.control.guard import ControlGuard, caller_of
from proxy.eventbus import EventBus
from proxy.facts import BadURL
from proxy.grant_rules import allow_grant_too_broad, guarded_class
from proxy.grants import GrantIndex
from proxy.policy.match import parse_pattern
from proxy.policy.model import Action, EffectivePolicy, Scope, parse_duration
from proxy.records import Grant, GrantFor
from proxy.store import Store, StoreError
from proxy.verdicts import Decision, Reason

KEEPALIVE_SECONDS = 15.0


class ApiError(Exception):
    """An error answered as `{"error": code, "detail": text}` with `status`."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass
class ReloadResult:
    ok: bool
    files: tuple[str, ...]
    errors: list[str]


@dataclass
class ControlContext:
    """What the control API may touch; built by the runtime."""

    token: str
    is_ready: Callable[[], bool]
    policy: Callable[[], EffectivePolicy]
    approvals: ApprovalQueue
    grants: GrantIndex
    store: Store
    audit: AuditWriter
    bus: EventBus
    reload: Callable[[], Awaitable[ReloadResult]]
    check: Callable[[str, str, str | None], Awaitable[Decision]]  # the live path's dry run
    rules_changed: Callable[[], Awaitable[int]]  # answers held requests the new rules decide
    # Who a bearer token is; None: only `token` is known, as role admin (the bootstrap token).
    verify: TokenVerifier | None = None
    # Host names the control API answers to besides its own address (run --control-host).
    hosts: tuple[str, ...] = ()


# -- request bodies -------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DecisionBody(_Body):
    scope: Scope = Scope.ONCE
    # None: the requesting agent, or every agent when the item has no verified agent
    grant_for: GrantFor | None = Field(None, alias="for")
    note: str = Field("", max_length=2000)


class GrantBody(_Body):
    pattern: str = Field(min_length=1, max_length=300)
    action: Action = Action.ALLOW
    scope: Literal[Scope.SESSION, Scope.ALWAYS] = Scope.ALWAYS
    agent: str | None = Field(None, max_length=128)
    note: str = Field("", max_length=2000)
    expires_at: float | None = Field(None, ge=0, le=1e11)
    # An allow grant whose IP/CIDR covers a loopback, private, link-local (metadata) or other
    # guarded address lifts the network guard there: it must say so, and needs the admin role.
    private: bool = False


class CheckBody(_Body):
    url: str = Field(min_length=1, max_length=4000)
    method: str = Field("GET", min_length=1, max_length=32, pattern=r"^[A-Za-z]+$")
    agent: str | None = Field(None, max_length=128)


# -- rendering ------------------------------------------------------------------------------


# The approval core's error codes as HTTP statuses (the core knows no HTTP).
APPROVAL_ERROR_STATUS: dict[ApprovalErrorCode, int] = {
    ApprovalErrorCode.NOT_FOUND: 404,
    ApprovalErrorCode.SCOPE_NOT_ALLOWED: 422,
    ApprovalErrorCode.FOR_AGENT_WITHOUT_AGENT: 422,
    ApprovalErrorCode.STORE_UNAVAILABLE: 503,
}


def grant_json(grant: Grant) -> dict[str, Any]:
    return {
        "id": grant.id,
        "pattern": grant.pattern,
        "action": grant.action.value,
        "scope": grant.scope.value,
        "agent": grant.agent,
        "session": grant.session,
        "created_by": grant.created_by,
        "note": grant.note,
        "created_at": grant.created_at,
        "expires_at": grant.expires_at,
    }


def decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "decision": decision.verdict.value,
        "reason": decision.reason.value,
        "rule": decision.rule,
        "source": decision.source,
        "detail": decision.detail,
    }


def policy_json(policy: EffectivePolicy) -> dict[str, Any]:
    def rules(ruleset: Any) -> list[dict[str, Any]]:
        return [{"pattern": r.pattern, "source": r.source} for r in ruleset]

    return {
        "files": list(policy.files),
        "mode": policy.mode.value,
        "default": policy.default.value,
        "allow": rules(policy.allow),
        "deny": rules(policy.deny),
        "network": {"ports": sorted(policy.ports), "block_private": policy.block_private},
        "approval": {
            "wait": policy.approval.wait,
            "pending_ttl": policy.approval.pending_ttl,
            "scopes": sorted(s.value for s in policy.approval.scopes),
        },
        "agents": {
            agent_id: {
                "default": section.default.value if section.default else None,
                "allow": rules(section.allow),
                "deny": rules(section.deny),
            }
            for agent_id, section in policy.agents.items()
        },
    }


def _error(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


async def require_token(request: Request) -> Caller:
    """The authenticated caller (name recorded on decisions, role). `ControlGuard` has checked
    the token before the body was read; this is the second lock, should a route ever be
    reached without the guard."""
    caller = caller_of(request.scope)
    if caller is not None:
        return caller
    try:
        return authenticate(request.headers.raw, request.app.state.verify_token)
    except AccessDenied as denied:
        raise ApiError(denied.status, denied.code, denied.detail) from None


Approver = Annotated[Caller, Depends(require_token)]


def require_role(caller: Caller, role: Role, action: str) -> None:
    """Raise 403 `<role>_role_required` unless `caller` holds `role`."""
    if not caller.role.allows(role):
        raise ApiError(403, f"{role.value}_role_required", f"{action} needs the {role.value} role")


def _announce(ctx: ControlContext, kind: str, data: dict[str, Any]) -> None:
    """Tell `/v1/events` subscribers what a caller did (the data names them under `by`)."""
    if ctx.bus is not None:  # a context built for a test may have no bus
        ctx.bus.publish(kind, data)


SESSION_SCAN_ROWS = 10_000  # audit rows read to list sessions (newest first)


async def session_listing(ctx: ControlContext, now: float) -> list[dict[str, Any]]:
    """Agent sessions: those the decision audit saw within the idle window
    (`approval.session_idle`) and those holding a live session grant. No table of their own:
    first/last seen come from the audit rows read (the newest SESSION_SCAN_ROWS within the
    window), so `first_seen` is the earliest one kept, not necessarily the session's start."""
    idle = ctx.policy().approval.session_idle
    rows = await ctx.store.list_decisions(limit=SESSION_SCAN_ROWS, since=now - idle)
    sessions: dict[tuple[str, str], dict[str, Any]] = {}

    def entry(agent: str, session: str) -> dict[str, Any]:
        return sessions.setdefault(
            (agent, session),
            {
                "agent": agent,
                "session": session,
                "first_seen": None,
                "last_seen": None,
                "requests": 0,
                "grants": [],
            },
        )

    for row in rows:
        if row.agent is None or row.session is None:
            continue
        item = entry(row.agent, row.session)
        item["requests"] += 1
        item["first_seen"] = min(item["first_seen"] or row.at, row.at)
        item["last_seen"] = max(item["last_seen"] or row.at, row.at)
    for grant in await ctx.store.list_grants(now):
        if grant.scope is Scope.SESSION and grant.agent is not None and grant.session:
            entry(grant.agent, grant.session)["grants"].append(grant_json(grant))
    for item in sessions.values():
        last = item["last_seen"]
        item["idle_expires_at"] = last + idle if last is not None else None
    return sorted(sessions.values(), key=lambda s: -(s["last_seen"] or 0.0))


def create_app(ctx: ControlContext) -> FastAPI:
    """Build the control app around `ctx`."""
    app = FastAPI(
        title="egress-warden control API",
        version=__version__,
        description="Approve held requests, manage grants, read the decision audit.",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.code, exc.detail, headers)

    @app.exception_handler(ApprovalError)
    async def _approval_error(_request: Request, exc: ApprovalError) -> JSONResponse:
        return _error(APPROVAL_ERROR_STATUS[exc.code], exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:10]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(
                f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg"))
            )
        return _error(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(
            500, "internal_error", "the control API hit an internal error; see the proxy log"
        )

    verify_token = ctx.verify or BootstrapToken(ctx.token)
    app.state.verify_token = verify_token
    # Outside routing and body parsing: the token is checked before a body byte is read.
    app.add_middleware(ControlGuard, verify=verify_token, hosts=ctx.hosts)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> JSONResponse:
        if not ctx.is_ready():
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    add_console_routes(app)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

    @v1.get("/whoami", tags=["access"])
    async def whoami(caller: Approver) -> dict[str, Any]:
        """Who the token is, and its role (the console shows what it may do)."""
        return {"name": caller.name, "role": caller.role.value}

    @v1.get("/pending", tags=["approvals"])
    async def list_pending() -> list[dict[str, Any]]:
        return [ctx.approvals.describe(item) for item, _ in await ctx.approvals.listing()]

    async def _resolve(
        item_id: str, body: DecisionBody, outcome: Outcome, approver: Caller
    ) -> dict[str, Any]:
        require_role(approver, Role.APPROVER, "deciding a held request")
        result = await ctx.approvals.resolve(
            item_id,
            outcome,
            scope=body.scope,
            grant_for=body.grant_for,
            note=body.note,
            approver=approver.name,
            allowed_scopes=ctx.policy().approval.scopes,
            session_ttl=ctx.policy().approval.session_idle,
        )
        return {
            "id": result.item.id,
            "resolution": result.verdict.outcome.value,
            "scope": result.verdict.scope.value,
            "for": result.verdict.grant_for.value,
            "released": result.released,
            "grant": grant_json(result.grant) if result.grant is not None else None,
            "by": approver.name,
        }

    @v1.post("/pending/{item_id}/approve", tags=["approvals"])
    async def approve(
        item_id: Annotated[str, Field(max_length=64)], body: DecisionBody, approver: Approver
    ) -> dict[str, Any]:
        return await _resolve(item_id, body, Outcome.APPROVED, approver)

    @v1.post("/pending/{item_id}/deny", tags=["approvals"])
    async def deny(
        item_id: Annotated[str, Field(max_length=64)], body: DecisionBody, approver: Approver
    ) -> dict[str, Any]:
        return await _resolve(item_id, body, Outcome.DENIED, approver)

    @v1.get("/grants", tags=["grants"])
    async def list_grants() -> list[dict[str, Any]]:
        return [grant_json(g) for g in ctx.grants.all()]

    @v1.post("/grants", tags=["grants"], status_code=201)
    async def create_grant(body: GrantBody, approver: Approver) -> dict[str, Any]:
        too_broad = allow_grant_too_broad(body.pattern) if body.action is Action.ALLOW else None
        if too_broad is not None:
            raise ApiError(422, "grant_too_broad", f"{too_broad}: allow grants must be narrower")
        try:
            parse_pattern(body.pattern)
        except ValueError as exc:
            raise ApiError(422, "invalid_pattern", str(exc)) from exc
        guarded = guarded_class(body.pattern) if body.action is Action.ALLOW else None
        if guarded is not None:
            if not body.private:
                raise ApiError(
                    422,
                    "private_grant_needs_flag",
                    f"{body.pattern!r} covers {guarded.value.replace('_', '-')} addresses, which"
                    ' the network guard blocks; to open them send "private": true (admin role)',
                )
            require_role(approver, Role.ADMIN, "an allow grant covering guarded addresses")
        require_role(approver, Role.APPROVER, "a grant")
        if body.expires_at is not None and body.expires_at <= time.time():
            raise ApiError(422, "invalid_request", "expires_at is in the past")
        grant = Grant(
            id="g-" + secrets.token_hex(6),
            pattern=body.pattern,
            action=body.action,
            scope=body.scope,
            agent=body.agent,
            created_by=approver.name,
            note=body.note,
            created_at=time.time(),
            expires_at=body.expires_at
            if body.expires_at is not None or body.scope is not Scope.SESSION
            else time.time() + ctx.policy().approval.session_idle,
        )
        await ctx.approvals.add_grant(grant)
        await ctx.rules_changed()
        _announce(ctx, "grant_added", {**grant_json(grant), "by": approver.name})
        return grant_json(grant)

    @v1.delete("/grants/{grant_id}", tags=["grants"])
    async def revoke_grant(
        grant_id: Annotated[str, Field(max_length=64)], approver: Approver
    ) -> dict[str, Any]:
        require_role(approver, Role.APPROVER, "revoking a grant")
        if not await ctx.approvals.revoke_grant(grant_id):
            raise ApiError(404, "not_found", f"no grant with id {grant_id!r}")
        _announce(ctx, "grant_revoked", {"id": grant_id, "by": approver.name})
        return {"id": grant_id, "revoked": True, "by": approver.name}

    @v1.get("/sessions", tags=["sessions"])
    async def list_sessions() -> list[dict[str, Any]]:
        try:
            await ctx.audit.flush()
            return await session_listing(ctx, time.time())
        except StoreError as exc:
            raise ApiError(503, "store_unavailable", str(exc)) from exc

    @v1.post("/sessions/{agent}/{session}/end", tags=["sessions"])
    async def end_session(
        agent: Annotated[str, Field(max_length=128)],
        session: Annotated[str, Field(max_length=128)],
        approver: Approver,
    ) -> dict[str, Any]:
        require_role(approver, Role.APPROVER, "ending a session")
        try:
            grants = await ctx.store.list_grants(time.time())
        except StoreError as exc:
            raise ApiError(503, "store_unavailable", str(exc)) from exc
        revoked = [
            g.id
            for g in grants
            if g.scope is Scope.SESSION and g.agent == agent and g.session == session
        ]
        for grant_id in revoked:
            await ctx.approvals.revoke_grant(grant_id)
        answer = {"agent": agent, "session": session, "revoked": revoked, "by": approver.name}
        _announce(ctx, "session_ended", answer)
        return answer

    @v1.get("/decisions", tags=["audit"])
    async def list_decisions(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        host: Annotated[str | None, Query(max_length=300)] = None,
        decision: Annotated[Literal["allow", "deny", "hold"] | None, Query()] = None,
        agent: Annotated[str | None, Query(max_length=128)] = None,
        reason: Annotated[Reason | None, Query()] = None,
        since: Annotated[
            str | None,
            Query(max_length=32, description="unix seconds, or a duration ago (30s, 5m, 1h, 1d)"),
        ] = None,
    ) -> list[dict[str, Any]]:
        cutoff: float | None = None
        if since is not None:
            # A plain number is a time (unix seconds); a duration (1h) is that long ago.
            try:
                cutoff = float(since)
            except ValueError:
                try:
                    cutoff = time.time() - parse_duration(since)
                except ValueError as exc:
                    raise ApiError(422, "invalid_since", str(exc)) from exc
        try:
            await ctx.audit.flush()
            rows = await ctx.store.list_decisions(
                limit=limit,
                host=host,
                decision=decision,
                agent=agent,
                reason=reason.value if reason is not None else None,
                since=cutoff,
            )
        except StoreError as exc:
            raise ApiError(503, "store_unavailable", str(exc)) from exc
        return await with_review_trails(ctx.store, rows)

    @v1.get("/policy", tags=["policy"])
    async def get_policy() -> dict[str, Any]:
        return policy_json(ctx.policy())

    @v1.post("/policy/reload", tags=["policy"])
    async def reload_policy(approver: Approver) -> JSONResponse:
        require_role(approver, Role.APPROVER, "a policy reload")
        result = await ctx.reload()
        body = {
            "ok": result.ok,
            "files": list(result.files),
            "errors": result.errors,
            "by": approver.name,
        }
        _announce(ctx, "policy_reloaded", body)
        if not result.ok:
            return JSONResponse(
                {"error": "policy_rejected", "detail": "; ".join(result.errors), **body},
                status_code=422,
            )
        return JSONResponse(body)

    @v1.post("/check", tags=["policy"])
    async def check(body: CheckBody) -> dict[str, Any]:
        try:
            decision = await ctx.check(body.url, body.method, body.agent)
        except BadURL as exc:
            raise ApiError(422, "invalid_url", str(exc)) from exc
        return decision_json(decision)

    @v1.get("/events", tags=["events"])
    async def events(request: Request) -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            yield ": egress-warden events\n\n"
            subscription = ctx.bus.subscribe()
            next_event = asyncio.ensure_future(anext(subscription))
            try:
                while not await request.is_disconnected():
                    done, _ = await asyncio.wait({next_event}, timeout=KEEPALIVE_SECONDS)
                    if not done:
                        yield ": keep-alive\n\n"
                        continue
                    kind, data = next_event.result()
                    yield f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
                    next_event = asyncio.ensure_future(anext(subscription))
            finally:
                next_event.cancel()
                await subscription.aclose()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    app.include_router(v1)
    return app
