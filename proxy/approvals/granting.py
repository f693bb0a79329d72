"""Grants made by approvals: stored first (the store is what every worker and replica
enforces), then announced; `once` passes for a retry; revocation everywhere."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from proxy.approvals.fleet import FleetChannel, FleetMessage, MessageKind
from proxy.approvals.model import Outcome, Verdict, grant_pattern
from proxy.grants import GrantIndex
from proxy.policy.model import Action, Scope
from proxy.records import Grant, GrantFor, PendingItem
from proxy.store import Store, StoreError

# Who a `once` window belongs to besides the agent: its session and its client's address.
type Origin = tuple[str | None, str | None]
type _WindowKey = tuple[str | None, str | None, str | None, str, int]


class GrantKeeper:
    """The grants side of approvals, over the store, the local index and the fleet channel."""

    def __init__(
        self, store: Store, index: GrantIndex, fleet: FleetChannel, clock: Callable[[], float]
    ) -> None:
        self._store = store
        self.index = index
        self._fleet = fleet
        self._clock = clock
        self._seen: tuple[int, float, str] | None = None  # the store's grants signature
        # (agent, session, client address, host, port) -> (until, verdict): once approvals
        # used here, see open_window
        self._windows: dict[_WindowKey, tuple[float, Verdict]] = {}

    def build(
        self,
        *,
        host: str,
        port: int,
        agent: str | None,
        session: str | None,
        action: Action,
        scope: Scope,
        grant_for: GrantFor,
        approver: str,
        note: str,
        session_ttl: float,
    ) -> Grant:
        """A grant for exactly host:port, for `agent` (or all), of `scope`."""
        for_agent = grant_for is GrantFor.AGENT
        now = self._clock()
        return Grant(
            id="g-" + secrets.token_hex(6),
            pattern=grant_pattern(host, port),
            action=action,
            scope=scope,
            agent=agent if for_agent else None,
            session=session if for_agent and scope is Scope.SESSION else None,
            created_by=approver,
            note=note,
            created_at=now,
            expires_at=now + session_ttl if scope is Scope.SESSION else None,
        )

    async def add(self, grant: Grant) -> None:
        """Store a grant of any scope, then tell the replicas at once (they also poll)."""
        await self._store.add_grant(grant)
        self.index.add(grant)
        self._fleet.publish(FleetMessage(MessageKind.GRANTS_CHANGED))

    async def revoke(self, grant_id: str) -> bool:
        """Remove a grant everywhere; False when no replica knew it."""
        local = self.index.remove(grant_id)
        stored = await self._store.delete_grant(grant_id)
        self._fleet.publish(FleetMessage(MessageKind.GRANT_REVOKED, grant_id))
        return local is not None or stored

    def forget(self, grant_id: str) -> None:
        """Another replica revoked or used up `grant_id`."""
        self.index.remove(grant_id)

    # -- once passes and windows ------------------------------------------------------------

    def once_pass(self, item: PendingItem, grant_for: GrantFor, approver: str, note: str) -> Grant:
        """The pass a `once` approval nobody waited for leaves: the agent's next retry gets
        through, once (stored with the item's resolution, in the same transaction)."""
        return Grant(
            id=f"once-{item.id}",
            pattern=grant_pattern(item.host, item.port),
            action=Action.ALLOW,
            scope=Scope.ONCE,
            agent=item.agent if grant_for is GrantFor.AGENT else None,
            created_by=approver,
            note=note,
            created_at=self._clock(),
            expires_at=item.expires_at,
        )

    def stored(self, grant: Grant) -> None:
        """Tell this process and the replicas about a grant the store now holds."""
        self.index.add(grant)
        self._fleet.publish(FleetMessage(MessageKind.GRANTS_CHANGED))

    async def take_once(
        self,
        agent: str | None,
        host: str,
        port: int,
        window: float,
        origin: Origin = (None, None),
    ) -> Verdict | None:
        """The `once` approval this request may use: an open window of one (see
        `open_window`), else a pass used up in the store (exactly one request gets each,
        whichever worker or replica it reaches); None when there is neither."""
        opened = self._windows.get((agent, *origin, host, port))
        if opened is not None and opened[0] > self._clock():
            return opened[1]
        pattern = grant_pattern(host, port)
        try:
            grant = await self._store.take_once_pass(pattern, agent, self._clock())
        except StoreError:
            return None
        if grant is None:
            return None
        self.index.remove(grant.id)
        self._fleet.publish(FleetMessage(MessageKind.GRANT_REVOKED, grant.id))
        verdict = Verdict(
            Outcome.APPROVED,
            grant.id.removeprefix("once-"),
            Scope.ONCE,
            GrantFor.AGENT if grant.agent is not None else GrantFor.ALL,
            grant.created_by,
            "human",
            grant.note,
            grant.id,
        )
        self.open_window(agent, host, port, verdict, window, origin)
        return verdict

    def open_window(
        self,
        agent: str | None,
        host: str,
        port: int,
        verdict: Verdict,
        seconds: float,
        origin: Origin = (None, None),
    ) -> None:
        """A `once` approval was used here: what the same agent session sends from the same
        client address (`origin`: session, address) to the same destination in the next
        `seconds` belongs to the same client operation (git's smart HTTP makes a GET then
        POSTs), so it is let through too. Per process; 0 turns windows off."""
        now = self._clock()
        for key in [k for k, (until, _) in self._windows.items() if until <= now]:
            del self._windows[key]
        if seconds > 0:
            self._windows[(agent, *origin, host, port)] = (now + seconds, verdict)

    # -- keeping in step -------------------------------------------------------------------

    async def resync(self) -> None:
        self._seen = await self._store.grants_signature()
        self.index.replace_persisted(await self._store.list_grants())

    async def poll(self) -> bool:
        """Re-read the grants when the store's signature moved (another worker or replica
        added, revoked or used one up); one small query when nothing changed."""
        if await self._store.grants_signature() == self._seen:
            return False
        await self.resync()
        return True
