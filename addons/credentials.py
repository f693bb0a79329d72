"""The edge of credential brokering and scanning: hands a flow's request line, headers and body
to `proxy.secrets`, what they found to the gate (`Gate.admit_secrets`), and writes swapped
headers back. It decides nothing.

Covered: requests inside inspected tunnels (placeholders, swapping, scanning) and plain HTTP
(placeholders only). A raw CONNECT tunnel is opaque: what travels in it is not seen.
Bodies: one that declares a length up to mitmproxy's stream threshold (`stream_large_bodies`,
1 MiB) is buffered and checked whole before anything leaves (a hit: 403). A larger or chunked
body is streamed, its first `MAX_BODY_BYTES` held back and checked before any byte is released:
a hit withholds the body, emits the refusal and closes the connection (the upstream has seen the
request head, never a body byte). Scans stop at `MAX_SCAN_SECONDS`; content past either bound
passes unscanned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import ctx, http

from proxy.facts import RequestFacts
from proxy.gate import Admission, Gate
from proxy.policy.model import ScanMode
from proxy.secrets import Finding
from proxy.secrets.broker import AgentSecrets, load_or_create_key
from proxy.secrets.detect import MAX_BODY_BYTES, Scan, decode_body
from proxy.verdicts import Reason

_PENDING = "egress.secrets"  # flow metadata: the body still has to be checked
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _BodyCheck:
    facts: RequestFacts
    scan: ScanMode
    mine: AgentSecrets | None


def _headers(request: http.Request) -> list[tuple[str, str]]:
    return list(request.headers.items(multi=True))


class CredentialGuard:
    """Placeholders and credentials in requests the proxy can see."""

    def __init__(
        self,
        gate: Gate,
        close_client: Callable[[str], None],
        state_dir: Path | None = None,
    ) -> None:
        self.gate = gate
        self._close_client = close_client
        self._state_dir = state_dir
        self._key: bytes | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _secrets_key(self) -> bytes:
        if self._key is None:
            # `egress-warden run` keeps mitmproxy's CA in <state dir>/ca: the key sits beside
            # it; under plain mitmdump it goes in mitmproxy's own confdir.
            confdir = Path(ctx.options.confdir).expanduser()
            state_dir = self._state_dir or (confdir.parent if confdir.name == "ca" else confdir)
            self._key = load_or_create_key(state_dir)
        return self._key

    def _mine(self, agent: str | None) -> AgentSecrets | None:
        secrets = self.gate.policy.secrets
        if not secrets:
            return None
        return AgentSecrets.of(self._secrets_key(), agent, secrets)

    def _scan_mode(self, facts: RequestFacts, inspected: bool) -> ScanMode:
        if not inspected or facts.host is None:
            return ScanMode.OFF
        rule = self.gate.policy.inspect_rule(facts.host, facts.port)
        return ScanMode.OFF if rule is None else rule.scan

    async def check_head(
        self, flow: http.HTTPFlow, facts: RequestFacts, *, inspected: bool
    ) -> Admission | None:
        """The refusal for the request line and headers, or None; a request that passes has
        its body checked in `check_body`."""
        request = flow.request
        mine = self._mine(facts.agent)
        scan = self._scan_mode(facts, inspected)
        if mine is None and scan is ScanMode.OFF:
            return None
        headers = _headers(request)
        finding: Finding | None = None
        if mine is not None:
            finding = mine.misuse(request.path, "url", facts.host, facts.port)
            finding = finding or mine.misuse_in_headers(headers, facts.host, facts.port)
        if finding is None and scan is not ScanMode.OFF:
            scanner = Scan(facts.host, facts.port, self.gate.policy.secrets)
            finding = scanner.text(request.path, "url") or scanner.headers(headers)
        if finding is not None:
            admission = await self.gate.admit_secrets(facts, finding, scan)
            if not admission.allowed:
                return admission
        flow.metadata[_PENDING] = _BodyCheck(facts, scan, mine)
        return None

    def hold_body(self, flow: http.HTTPFlow) -> None:
        """Once the request is admitted: a large or chunked body (which mitmproxy streams past
        1 MiB) is held back until checked, in front of whatever already reads the stream."""
        request = flow.request
        check = flow.metadata.get(_PENDING)
        if not isinstance(check, _BodyCheck):
            return
        if request.stream or "content-length" not in request.headers:
            del flow.metadata[_PENDING]
            # What reads the stream already (the warden's byte meter) reads what is released.
            meter = flow.metadata.get("egress.meter")
            after = (
                request.stream if callable(request.stream) else getattr(meter, "count_sent", None)
            )
            request.stream = _HeldBody(self, flow, check, after)

    def swap(self, flow: http.HTTPFlow, facts: RequestFacts) -> None:
        """On an owner host, the agent's placeholders become the real values (inspected only)."""
        mine = self._mine(facts.agent)
        if mine is None:
            return
        swapped, unavailable = mine.swap(_headers(flow.request), facts.host, facts.port)
        for secret_id in unavailable:
            log.warning("egress-warden: secret %r is unavailable; not injected", secret_id)
        if swapped is not None:
            flow.request.headers = http.Headers(
                [
                    (k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                    for k, v in swapped
                ]
            )

    def _body_finding(self, check: _BodyCheck, raw: bytes, request: http.Request) -> Finding | None:
        facts = check.facts
        encoding = request.headers.get("content-encoding")
        finding: Finding | None = None
        if check.mine is not None:
            text = decode_body(raw, encoding, MAX_BODY_BYTES).decode("utf-8", "replace")
            finding = check.mine.misuse(text, "body", facts.host, facts.port)
        if finding is None and check.scan is not ScanMode.OFF:
            scanner = Scan(facts.host, facts.port, self.gate.policy.secrets)
            finding = scanner.body(raw, encoding, request.headers.get("content-type"))
        return finding

    def refuse_streamed(self, flow: http.HTTPFlow, check: _BodyCheck, finding: Finding) -> None:
        """A hit in a streamed body: the gate decides (and emits) in a task; a refusal closes
        the connection (the body stays withheld meanwhile)."""

        async def decide() -> None:
            admission = await self.gate.admit_secrets(check.facts, finding, check.scan)
            if not admission.allowed:
                self._close_client(flow.client_conn.id)

        task = asyncio.get_running_loop().create_task(decide())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check_body(self, flow: http.HTTPFlow) -> tuple[Admission, RequestFacts] | None:
        """The refusal for the body of a request `check_head` passed, or None."""
        pending = flow.metadata.pop(_PENDING, None)
        if not isinstance(pending, _BodyCheck) or flow.response is not None:
            return None
        raw = flow.request.raw_content or b""
        # Off the event loop: a scan may take up to MAX_SCAN_SECONDS; other flows go on.
        finding = (
            await asyncio.to_thread(self._body_finding, pending, raw, flow.request) if raw else None
        )
        if finding is None:
            return None
        admission = await self.gate.admit_secrets(pending.facts, finding, pending.scan)
        return None if admission.allowed else (admission, pending.facts)


class _HeldBody:
    """`request.stream` for a large or chunked body: holds the first `MAX_BODY_BYTES` back
    until they are checked, then lets everything through; after a hit, nothing."""

    def __init__(
        self,
        guard: CredentialGuard,
        flow: http.HTTPFlow,
        check: _BodyCheck,
        after: Callable[[bytes], bytes | Iterable[bytes]] | None,
    ) -> None:
        self._after = after
        self._guard = guard
        self._flow = flow
        self._check = check
        self._held = bytearray()
        self._state = "holding"  # -> "released" | "withheld"

    def __call__(self, chunk: bytes) -> list[bytes]:
        out = self._pass(chunk)
        if self._after is None:
            return out
        passed: list[bytes] = []
        for piece in out:
            result = self._after(piece)
            passed.extend([result] if isinstance(result, bytes) else result)
        return passed

    def _pass(self, chunk: bytes) -> list[bytes]:
        if self._state == "released":
            return [chunk] if chunk else []
        if self._state == "withheld":
            return []
        self._held += chunk
        if chunk and len(self._held) < MAX_BODY_BYTES:
            return []
        finding = self._guard._body_finding(self._check, bytes(self._held), self._flow.request)
        if finding is not None:
            self._guard.refuse_streamed(self._flow, self._check, finding)
            if finding.reason is not Reason.SECRET_DETECTED or self._check.scan is ScanMode.ENFORCE:
                self._state = "withheld"
                self._held.clear()
                return []
        self._state = "released"
        out = bytes(self._held)
        self._held.clear()
        return [out] if out else []
