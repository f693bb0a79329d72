"""`list_decisions` filters by agent, reason and time, the same on SQLite and PostgreSQL (the
shared `decisions_query` (proxy/store/sql.py)): what `GET /v1/decisions?agent=&reason=&since=` and
`egress-warden decisions --agent --reason --since` rely on."""

from __future__ import annotations

import dataclasses

from proxy.store import Store
from tests.unit.test_store_contract import open_backend, pg_server, store  # noqa: F401
from tests.unit.test_store_sqlite import NOW, decision


async def test_decisions_filter_by_agent_reason_and_since(store: Store) -> None:  # noqa: F811
    rows = [
        dataclasses.replace(decision(0), agent="alice", reason="deny_rule"),
        dataclasses.replace(decision(1), agent="bob", reason="deny_rule"),
        dataclasses.replace(decision(2), agent="alice", reason="port"),
        dataclasses.replace(decision(3), agent=None, reason="deny_rule"),
        dataclasses.replace(decision(4), agent="alice", reason="deny_rule"),
    ]
    await store.record_decisions(rows)
    assert await store.list_decisions(agent="alice") == [rows[4], rows[2], rows[0]]
    assert await store.list_decisions(reason="deny_rule") == [rows[4], rows[3], rows[1], rows[0]]
    assert await store.list_decisions(agent="alice", reason="deny_rule") == [rows[4], rows[0]]
    assert await store.list_decisions(since=NOW + 2) == [rows[4], rows[3], rows[2]]
    assert await store.list_decisions(agent="alice", reason="deny_rule", since=NOW + 1) == [rows[4]]
    assert await store.list_decisions(agent="carol") == []
    assert await store.list_decisions(since=NOW + 100) == []
    # the filters combine with the old ones and the limit
    assert await store.list_decisions(limit=1, agent="alice", host="a.test") == [rows[4]]
