"""What an agent sees when it is refused (SPEC section 4): status, reason phrase, headers, body.

The reader is usually a language model deciding what to try next, so each reason gets its own
message saying what can help and what cannot: deny rules, ports and the network guard are never
offered an approval, a held request names its pending item. With `Accept: application/json` the
body is a JSON object (docs/refusals.md has its schema); plain text is the default.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass

from proxy.facts import RequestFacts
from proxy.identity import SESSION_SEPARATOR
from proxy.policy.model import RefusalSettings
from proxy.verdicts import Decision, Reason, Tier

JUSTIFICATION_HEADER = "X-Egress-Warden-Justification"
RETRY_SOON = 5  # seconds: Retry-After when only time may help (a queue briefly unavailable)

# RFC 9209 proxy error types for the Proxy-Status header.
_PROXY_STATUS_ERROR: dict[Reason, str] = {
    Reason.PRIVATE_NETWORK: "destination_ip_prohibited",
    Reason.DNS_FAILURE: "dns_error",
    Reason.INVALID_HOST: "destination_not_found",
}

_STATUS: dict[Reason, int] = {
    Reason.DNS_FAILURE: 502,
    Reason.AUTH_REQUIRED: 407,
    Reason.INVALID_METHOD: 400,
}

# Refusals no approval can lift: their bodies never speak of approving or of pending items
# (a held request the policy later denies still carries its item id; it is not shown).
NEVER_APPROVABLE: frozenset[Reason] = frozenset(
    {
        Reason.DENY_RULE,
        Reason.PORT,
        Reason.METHOD,
        Reason.PRIVATE_NETWORK,
        Reason.HOST_MISMATCH,
        Reason.INVALID_HOST,
        Reason.INVALID_REQUEST,
        Reason.INVALID_METHOD,
        Reason.SECRET_MISUSE,
        Reason.SECRET_DETECTED,
    }
)

_PREFIX: dict[int, str] = {
    502: "Egress failed",
    407: "Proxy authentication required",
    400: "Bad request",
}


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


def _seconds(value: float) -> str:
    return f"{value:g}s" if value < 120 else f"{value / 60:g}m"


def summary(decision: Decision, facts: RequestFacts, pending_id: str | None = None) -> str:
    """One human line: why this request is refused (also the reason phrase's tail)."""
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
        case Reason.APPROVAL_LIMIT:
            return f"{target} not queued: too many requests wait for approval"
        case Reason.APPROVAL_UNAVAILABLE:
            return f"{target} not queued: approvals are unavailable"
        case Reason.DNS_FAILURE:
            return f"{target} could not be resolved"
        case Reason.AUTH_REQUIRED:
            return f"{target}: {decision.detail}"
        case Reason.HOST_MISMATCH:
            return f"{target} denied: {decision.detail or 'the named hosts differ'}"
        case Reason.REVOKED:
            return f"{target} closed: {decision.detail or 'its admission was revoked'}"
        case _:
            return f"{target} denied: {decision.detail or decision.reason.value}"


def _owner(decision: Decision) -> str:
    """Who owns what refused it: the requirements, a policy file, or a runtime grant."""
    source = decision.source or ""
    if source.startswith(("grant:", "g-")):
        return (
            f"It is a runtime deny grant ({source}) an egress-warden administrator made; "
            "only they can revoke it."
        )
    file = source.rpartition(":")[0] or source or "the policy"
    if decision.tier is Tier.FLOOR:
        return (
            f"It comes from the organisation's requirements file ({file}), which no policy "
            "file can lift; only its owners can change it."
        )
    return f"It comes from the policy file {file}; only whoever maintains that file can change it."


def retry_after(decision: Decision, approval_wait: float) -> int | None:
    """Seconds after which a retry may pass, for the reasons where waiting can help."""
    if decision.reason is Reason.APPROVAL_PENDING:
        return math.ceil(approval_wait) if approval_wait >= 1 else RETRY_SOON
    if decision.reason is Reason.APPROVAL_UNAVAILABLE:
        return RETRY_SOON
    return None


def help_text(
    decision: Decision, facts: RequestFacts, pending_id: str | None, wait_hint: int | None
) -> str:
    """What can help and what cannot, for this reason: the heart of the body."""
    target = facts.target
    detail = decision.detail
    match decision.reason:
        case Reason.DENY_RULE:
            rule = f"'{decision.rule}'" + (f" ({decision.source})" if decision.source else "")
            return (
                f"{target} matches the deny rule {rule}. A deny rule always wins: no request, "
                "retry or access request at the proxy can lift it, and retrying will be refused "
                f"the same way. {_owner(decision)} If you need this destination, tell your user "
                "which rule blocks it; otherwise use another source."
            )
        case Reason.PORT:
            where = (
                "the organisation's requirements"
                if decision.tier is Tier.FLOOR
                else "the policy (network.ports)"
            )
            return (
                f"Port {facts.port} is not among the ports {where} allow, and no rule for this "
                "host names that port. Retrying or asking at the proxy will not change it. "
                "Use the service's standard port (80 or 443) if it has one, or tell your user "
                "that a rule naming this host and port must be added to the policy."
            )
        case Reason.PRIVATE_NETWORK:
            return (
                f"{target} is (or resolves to) a loopback, private, link-local or otherwise "
                "guarded address, or the proxy itself: such addresses are never reachable "
                "through this proxy, and no retry or access request here changes that. Reach "
                "it some other way than through the proxy, or use a public address."
            )
        case Reason.DEFAULT_DENY:
            return (
                f"No rule allows {target}, and the policy's default for destinations it does "
                "not list is deny. Nothing was queued for review, so there is nothing waiting "
                "to be decided: access needs an allow rule added to the policy (or an allow "
                "grant made by an egress-warden administrator). Retrying as is will be refused "
                "the same way."
            )
        case Reason.APPROVAL_PENDING:
            ident = pending_id or "(none)"
            when = f" (Retry-After: {wait_hint} seconds)" if wait_hint is not None else ""
            return (
                f"{target} is not in the policy, so it was held for review as pending item "
                f"{ident}, not decided yet ({detail or 'no answer in time'}). The item "
                "stays pending: nothing more is needed to ask for it. Retry the same request "
                f"later{when}: once an approver approves item {ident}, the retry passes; while "
                "it is undecided the retry waits again. To tell the approver why you need it, "
                f"retry with the header '{JUSTIFICATION_HEADER}: <one short line>' (for HTTPS "
                "send it to the proxy with the CONNECT, e.g. curl --proxy-header). An "
                f"administrator approves with: egress-warden approve {ident}"
            )
        case Reason.APPROVAL_DENIED:
            return (
                f"An approver refused the request for {target}: {detail or 'denied'}. "
                "Retrying the same request will not change that answer; if the destination is "
                "really needed, tell your user why, and retry with a justification in the "
                f"header '{JUSTIFICATION_HEADER}: <one short line>' once they agree."
            )
        case Reason.APPROVAL_LIMIT:
            return (
                f"Too many requests already wait for review ({detail or 'limit reached'}), so "
                f"no pending item was made for {target}. Retrying now will be refused the same "
                "way until an administrator answers the waiting items (egress-warden pending) "
                "or they expire (approval.pending_ttl). Avoid asking for many new destinations "
                "at once."
            )
        case Reason.APPROVAL_UNAVAILABLE:
            return (
                f"The proxy could not queue {target} for review: its approval queue is "
                f"unavailable ({detail or 'unavailable'}). Nothing was queued. Destinations the "
                "policy allows still work; retry this one in a few seconds."
            )
        case Reason.AUTH_REQUIRED:
            return (
                "This proxy needs the agent's credentials: send Proxy-Authorization: Basic with "
                "the agent id as the username and the agent's token as the password. In a "
                "proxy URL: HTTPS_PROXY=http://AGENT:TOKEN@PROXY_HOST:PORT, or with a session "
                f"id http://AGENT{SESSION_SEPARATOR}SESSION:TOKEN@PROXY_HOST:PORT (curl: "
                "--proxy-user AGENT:TOKEN). `egress-warden env --agent AGENT` prints the "
                "settings an agent process needs. An unknown agent and a wrong token get this "
                "same answer."
            )
        case Reason.DNS_FAILURE:
            return (
                f"The proxy could not resolve {facts.host.name if facts.host else target} "
                f"({detail or 'no address'}). Check the name's spelling; if it is right, the "
                "failure may be temporary: retry later. No access request helps with this."
            )
        case Reason.HOST_MISMATCH:
            return (
                "The request names two different destinations (its target, Host header or "
                f"TLS server name disagree: {detail or 'mismatch'}). Send each request with "
                "one consistent host; a request like this is always refused."
            )
        case Reason.INVALID_HOST:
            return (
                f"The destination host is not a valid host name or address ({detail or 'invalid'})"
                ". Fix the URL; a request like this is always refused."
            )
        case Reason.INVALID_METHOD | Reason.INVALID_REQUEST:
            return (
                f"The request is malformed ({detail or decision.reason.value}). Fix the request; "
                "one like this is always refused."
            )
        case Reason.SECRET_MISUSE:
            return (
                f"The request to {target} carries the placeholder of a brokered secret "
                f"({detail or 'placeholder'}). A placeholder is only exchanged for the real "
                "credential on the hosts that secret belongs to; anywhere else it is refused, "
                "and retrying will be refused the same way. Send it only to its own service."
            )
        case Reason.SECRET_DETECTED:
            return (
                f"The request to {target} appears to carry a credential ({detail or 'detected'}) "
                "and this host is not where that kind of credential belongs. Nothing was sent. "
                "Remove the credential from the request; if it is a false positive, tell your "
                "user (an inspect rule's `scan: report` or `off` relaxes this host)."
            )
        case Reason.METHOD:
            rule = f" ({decision.source})" if decision.source else ""
            return (
                f"{detail or 'This method is not allowed on this host'}: the policy's inspect "
                f"rule for {decision.rule or target}{rule} limits the methods. Retrying will be "
                f"refused the same way. {_owner(decision)}"
            )
        case Reason.REVOKED:
            return (
                f"The connection to {target} was closed: what admitted it no longer does "
                f"({detail or 'revoked'}). A new request is decided under the rules in force now."
            )
        case _:
            return f"{target} is refused ({detail or decision.reason.value})."


def wants_json(accept: str | None) -> bool:
    """True when `Accept` prefers application/json to text (media ranges with q-values)."""
    if not accept:
        return False
    json_q = text_q = 0.0
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == "application/json":
            json_q = max(json_q, q)
        elif media in ("text/plain", "text/*"):
            text_q = max(text_q, q)
    return json_q > 0 and json_q >= text_q


def render_refusal(
    decision: Decision,
    facts: RequestFacts,
    pending_id: str | None = None,
    *,
    accept: str | None = None,
    settings: RefusalSettings | None = None,
    approval_wait: float = 0.0,
) -> Refusal:
    """Render the 403 (407 for credentials, 400 for a malformed request, 502 for a name that
    does not resolve) an agent gets; JSON when `accept` asks for it."""
    settings = settings or RefusalSettings()
    if decision.reason in NEVER_APPROVABLE:
        pending_id = None
    status = _STATUS.get(decision.reason, 403)
    line = summary(decision, facts, pending_id)
    prefix = _PREFIX.get(status, "Blocked by egress policy")
    wait_hint = retry_after(decision, approval_wait)
    advice = help_text(decision, facts, pending_id, wait_hint)
    error = _PROXY_STATUS_ERROR.get(decision.reason, "http_request_denied")
    as_json = wants_json(accept)
    headers: list[tuple[str, str]] = [
        ("Content-Type", "application/json" if as_json else "text/plain; charset=utf-8"),
        ("Proxy-Status", f"egress-warden; error={error}; details={_sf_string(line)}"),
        ("X-Egress-Warden-Reason", decision.reason.value),
        ("X-Egress-Warden-Request-Id", facts.request_id),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
        ("Vary", "Accept"),
    ]
    if pending_id:
        headers.append(("X-Egress-Warden-Pending-Id", pending_id))
    if wait_hint is not None:
        headers.append(("Retry-After", str(wait_hint)))
    if status == 407:
        headers.append(("Proxy-Authenticate", 'Basic realm="egress-warden"'))
    if as_json:
        body = _json_body(decision, facts, pending_id, wait_hint, line, advice, settings)
    else:
        body = _text_body(decision, facts, pending_id, prefix, line, advice, settings)
    return Refusal(status, _phrase_text(f"{prefix}: {line}"), tuple(headers), body)


def _text_body(
    decision: Decision,
    facts: RequestFacts,
    pending_id: str | None,
    prefix: str,
    line: str,
    advice: str,
    settings: RefusalSettings,
) -> str:
    lines = [
        f"egress-warden: {prefix.lower()}: {line}",
        "",
        f"  destination: {facts.target}",
        f"  reason:      {decision.reason.value}",
    ]
    if decision.rule:
        where = f" ({decision.source})" if decision.source else ""
        lines.append(f"  rule:        {decision.rule}{where}")
    if pending_id:
        lines.append(f"  pending id:  {pending_id}")
    lines.append(f"  request id:  {facts.request_id}")
    # Wrapped for a terminal; words (ids, URLs, header names) are never split.
    lines += ["", textwrap.fill(advice, 78, break_long_words=False, break_on_hyphens=False)]
    if settings.contact:
        lines.append(f"Who to ask: {settings.contact}")
    if settings.help_url:
        lines.append(f"More help: {settings.help_url}")
    return "\n".join(lines) + "\n"


def _json_body(
    decision: Decision,
    facts: RequestFacts,
    pending_id: str | None,
    wait_hint: int | None,
    line: str,
    advice: str,
    settings: RefusalSettings,
) -> str:
    document: dict[str, object] = {
        "reason": decision.reason.value,
        "message": line,
        "destination": facts.target,
        "rule": decision.rule,
        "source": decision.source,
        "pending_id": pending_id,
        "request_id": facts.request_id,
        "retry_after": wait_hint,
        "help": advice,
    }
    if settings.contact:
        document["contact"] = settings.contact
    if settings.help_url:
        document["help_url"] = settings.help_url
    # ASCII only: a body read by any client in any encoding says the same thing.
    return json.dumps(document, ensure_ascii=True) + "\n"
