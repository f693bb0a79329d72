"""What an agent sees when it is refused (SPEC section 4): status, reason phrase, headers, body."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.facts import RequestFacts
from proxy.verdicts import Decision, Reason

# RFC 9209 proxy error types for the Proxy-Status header.
_PROXY_STATUS_ERROR: dict[Reason, str] = {
    Reason.PRIVATE_NETWORK: "destination_ip_prohibited",
    Reason.DNS_FAILURE: "dns_error",
    Reason.INVALID_HOST: "destination_not_found",
}

_HOW_TO_ASK = (
    "To get access, ask an egress-warden administrator to approve the pending request\n"
    "(egress-warden pending / egress-warden approve ID) or to add an allow rule to the policy.\n"
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A rendered refusal, independent of any HTTP library."""

    status: int
    reason_phrase: str
    headers: tuple[tuple[str, str], ...]
    body: str


def _sf_string(text: str) -> str:
    """An RFC 8941 structured-field string (printable ASCII, quotes and backslashes escaped)."""
    printable = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _phrase_text(text: str) -> str:
    """Reason phrases must be one line of visible ASCII."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def summary(decision: Decision, facts: RequestFacts, pending_id: str | None = None) -> str:
    """One human line: why this request is refused."""
    target = facts.target
    match decision.reason:
        case Reason.DENY_RULE:
            return f"{target} denied by rule '{decision.rule}'"
        case Reason.PORT:
            return f"{target} denied: port {facts.port} is not allowed"
        case Reason.PRIVATE_NETWORK:
            return f"{target} denied: {decision.detail}"
        case Reason.DEFAULT_DENY:
            return f"{target} denied: no rule allows it"
        case Reason.APPROVAL_PENDING:
            suffix = f" (pending id {pending_id})" if pending_id else ""
            return f"{target} is waiting for approval{suffix}"
        case Reason.APPROVAL_DENIED:
            return f"{target} denied by an approver"
        case Reason.DNS_FAILURE:
            return f"{target} could not be resolved"
        case Reason.AUTH_REQUIRED:
            return f"{target}: {decision.detail}"
        case _:
            return f"{target} denied: {decision.detail or decision.reason.value}"


def render_refusal(
    decision: Decision, facts: RequestFacts, pending_id: str | None = None
) -> Refusal:
    """Render the 403 (or 502 for DNS failure) an agent gets for a refused request."""
    status = {
        Reason.DNS_FAILURE: 502,
        Reason.AUTH_REQUIRED: 407,
        Reason.INVALID_METHOD: 400,
    }.get(decision.reason, 403)
    line = summary(decision, facts, pending_id)
    prefix = {
        502: "Egress failed",
        407: "Proxy authentication required",
        400: "Bad request",
    }.get(status, "Blocked by egress policy")
    error = _PROXY_STATUS_ERROR.get(decision.reason, "http_request_denied")
    headers: list[tuple[str, str]] = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Proxy-Status", f"egress-warden; error={error}; details={_sf_string(line)}"),
        ("X-Egress-Warden-Reason", decision.reason.value),
        ("X-Egress-Warden-Request-Id", facts.request_id),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
    ]
    if pending_id:
        headers.append(("X-Egress-Warden-Pending-Id", pending_id))
    if status == 407:
        headers.append(("Proxy-Authenticate", 'Basic realm="egress-warden"'))
    lines = [
        f"egress-warden: {prefix.lower()}: {line}",
        "",
        f"  destination: {facts.target}",
        f"  reason:      {decision.reason.value}",
    ]
    if decision.rule:
        lines.append(f"  rule:        {decision.rule} ({decision.source})")
    if pending_id:
        lines.append(f"  pending id:  {pending_id}")
    lines.append(f"  request id:  {facts.request_id}")
    body = "\n".join(lines) + "\n"
    if status == 407:
        body += (
            "\nSend Proxy-Authorization: Basic with username AGENT (or AGENT/SESSION) and the\n"
            "agent's token as password, e.g. HTTPS_PROXY=http://AGENT:TOKEN@proxy:8080\n"
        )
    elif decision.reason not in (
        Reason.DNS_FAILURE,
        Reason.INVALID_HOST,
        Reason.INVALID_REQUEST,
        Reason.INVALID_METHOD,
    ):
        body += "\n" + _HOW_TO_ASK
    return Refusal(status, _phrase_text(f"{prefix}: {line}"), tuple(headers), body)
