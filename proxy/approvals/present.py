"""Approvals as the control API and the event stream show them."""

from __future__ import annotations

import json
from typing import Any

import structlog

from proxy.audit import record_json
from proxy.records import ApprovalRecord, DecisionRecord, PendingItem
from proxy.store import Store, StoreError

log = structlog.get_logger("egress-warden")


def describe(item: PendingItem, waiting: int) -> dict[str, Any]:
    """The API/SSE shape of a pending item (`waiting`: requests held on it here)."""
    return {
        "id": item.id,
        "host": item.host,
        "port": item.port,
        "scheme": item.scheme,
        "method": item.method,
        "agent": item.agent,
        "session": item.session,
        "first_seen": item.first_seen,
        "last_seen": item.last_seen,
        "count": item.count,
        "expires_at": item.expires_at,
        "review": review_json(item.review),
        "justification": item.justification,
        "waiting": waiting,
    }


def review_json(stored: str | None) -> Any:
    """A stored review (JSON text) as the API shows it: the object, or the text if it is not
    JSON (rows written before the review tier)."""
    if stored is None:
        return None
    try:
        return json.loads(stored)
    except ValueError:
        return stored


def review_trail(record: ApprovalRecord | None) -> dict[str, Any] | None:
    """The review trail of a decision row (`GET /v1/decisions`): the latest approval-history
    row of its pending item or automatic review (who decided, why, the signals)."""
    if record is None:
        return None
    stored = review_json(record.review)
    trail: dict[str, Any] = {
        "state": record.state,
        "reviewer": record.reviewer,
        "approver": record.approver,
        "rationale": record.note or None,
        "scope": record.scope.value if record.scope is not None else None,
    }
    if isinstance(stored, dict):
        trail["signals"] = stored.get("signals", [])
        trail["trail"] = stored.get("trail", [])
    return trail


async def with_review_trails(store: Store, rows: list[DecisionRecord]) -> list[dict[str, Any]]:
    """Decision rows as the API shows them, each with its `review` trail (None when the row
    was not held or reviewed; also None for all when the history cannot be read now)."""
    ids = {r.pending_id for r in rows if r.pending_id is not None}
    try:
        trails = {i: review_trail(await store.latest_approval(i)) for i in ids}
    except StoreError as exc:
        log.warning("egress.store", error=str(exc))
        trails = {}
    return [
        {**record_json(r), "review": trails.get(r.pending_id) if r.pending_id else None}
        for r in rows
    ]
