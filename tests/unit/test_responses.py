"""The refusal an agent reads: one message per reason, saying what can help and what cannot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.facts import RequestFacts, Transport
from proxy.hosts import canonicalize_host
from proxy.policy.model import RefusalSettings
from proxy.responses import NEVER_APPROVABLE, render_refusal, wants_json
from proxy.verdicts import Decision, Reason, Tier, Verdict

FACTS = RequestFacts(
    request_id="0123456789abcdef",
    raw_host="paste.pastebin.test",
    host=canonicalize_host("paste.pastebin.test"),
    port=443,
    transport=Transport.HTTPS_CONNECT,
    method="CONNECT",
    scheme="https",
)
TARGET = "paste.pastebin.test:443"

DENY_RULE = Decision(
    Verdict.DENY, Reason.DENY_RULE, "**.pastebin.test", "/etc/ew/policy.yaml:12", "denied by rule"
)
FLOOR_RULE = Decision(
    Verdict.DENY,
    Reason.DENY_RULE,
    "**.pastebin.test",
    "/etc/ew/requirements.yaml:4",
    "denied by rule",
    Tier.FLOOR,
)
GRANT_RULE = Decision(Verdict.DENY, Reason.DENY_RULE, "**.pastebin.test", "grant:g-1a2b", "x")
PORT = Decision(Verdict.DENY, Reason.PORT, detail="port 8443 is not allowed")
PRIVATE = Decision(
    Verdict.DENY, Reason.PRIVATE_NETWORK, detail="169.254.169.254 is a link_local address"
)
DEFAULT_DENY = Decision(Verdict.DENY, Reason.DEFAULT_DENY, detail="no rule allows it")
PENDING = Decision(Verdict.DENY, Reason.APPROVAL_PENDING, detail="no answer in time")
DENIED = Decision(
    Verdict.DENY,
    Reason.APPROVAL_DENIED,
    None,
    "approval:p-77",
    "denied by alice (scope once): not needed for this task",
    Tier.FLOOR,
)
LIMIT = Decision(Verdict.DENY, Reason.APPROVAL_LIMIT, detail="agent has 20 pending items")
UNAVAILABLE = Decision(Verdict.DENY, Reason.APPROVAL_UNAVAILABLE, detail="store unreachable")
AUTH = Decision(Verdict.DENY, Reason.AUTH_REQUIRED, detail="proxy credentials required")
DNS = Decision(Verdict.DENY, Reason.DNS_FAILURE, detail="no address for the name")
MISMATCH = Decision(
    Verdict.DENY, Reason.HOST_MISMATCH, detail="Host header 'other.test' does not match"
)
INVALID_HOST = Decision(Verdict.DENY, Reason.INVALID_HOST, detail="invalid host")
INVALID_REQUEST = Decision(Verdict.DENY, Reason.INVALID_REQUEST, detail="malformed ClientHello")
INVALID_METHOD = Decision(Verdict.DENY, Reason.INVALID_METHOD, detail="not an HTTP token")
REVOKED = Decision(Verdict.DENY, Reason.REVOKED, detail="the grant that admitted it is gone")
METHOD = Decision(
    Verdict.DENY, Reason.METHOD, "api.test", "policy.yaml:30", "method POST not allowed on api.test"
)

ALL = [
    DENY_RULE,
    PORT,
    PRIVATE,
    DEFAULT_DENY,
    PENDING,
    DENIED,
    LIMIT,
    UNAVAILABLE,
    AUTH,
    DNS,
    MISMATCH,
    INVALID_HOST,
    INVALID_REQUEST,
    INVALID_METHOD,
    REVOKED,
    METHOD,
]


def _flat(body: str) -> str:
    """A text body with its wrapping (and column padding) undone."""
    return " ".join(body.split())


def _headers(decision: Decision, **kwargs: object) -> dict[str, str]:
    return dict(render_refusal(decision, FACTS, **kwargs).headers)  # type: ignore[arg-type]


def _json(decision: Decision, pending_id: str | None = None, **kwargs: object) -> dict[str, object]:
    refusal = render_refusal(
        decision,
        FACTS,
        pending_id,
        accept="application/json",
        **kwargs,  # type: ignore[arg-type]
    )
    document = json.loads(refusal.body)
    assert isinstance(document, dict)
    return document


# -- one message per reason --------------------------------------------------------------------


def test_deny_rule_names_rule_and_file_line_and_says_nothing_at_the_proxy_lifts_it() -> None:
    refusal = render_refusal(DENY_RULE, FACTS)
    assert refusal.status == 403
    assert (
        refusal.reason_phrase
        == f"Blocked by egress policy: {TARGET} denied by rule '**.pastebin.test'"
    )
    assert "rule: **.pastebin.test (/etc/ew/policy.yaml:12)" in _flat(refusal.body)
    assert "deny rule always wins" in _flat(refusal.body)
    assert "no request, retry or access request at the proxy can lift it" in _flat(refusal.body)
    assert "policy file /etc/ew/policy.yaml; only whoever maintains that file" in _flat(
        refusal.body
    )


def test_deny_rule_from_requirements_names_the_requirements_as_owner() -> None:
    body = _flat(render_refusal(FLOOR_RULE, FACTS).body)
    assert "organisation's requirements file (/etc/ew/requirements.yaml)" in body


def test_deny_rule_from_grant_names_the_grant_and_who_can_revoke_it() -> None:
    body = _flat(render_refusal(GRANT_RULE, FACTS).body)
    assert "runtime deny grant (grant:g-1a2b)" in body
    assert "only they can revoke it" in body


def test_port_says_which_port_and_that_a_rule_naming_it_is_needed() -> None:
    refusal = render_refusal(PORT, replace_port(8443))
    assert refusal.status == 403
    assert refusal.reason_phrase.endswith("denied: port 8443 is not allowed")
    assert "Port 8443 is not among the ports the policy (network.ports) allow" in _flat(
        refusal.body
    )
    assert "a rule naming this host and port must be added" in _flat(refusal.body)


def test_private_network_is_never_reachable_through_the_proxy() -> None:
    refusal = render_refusal(PRIVATE, FACTS)
    assert refusal.status == 403
    assert "never reachable through this proxy" in _flat(refusal.body)
    assert dict(refusal.headers)["Proxy-Status"].startswith(
        "egress-warden; error=destination_ip_prohibited"
    )


def test_default_deny_says_no_rule_allows_it_and_nothing_is_pending() -> None:
    body = _flat(render_refusal(DEFAULT_DENY, FACTS).body)
    assert f"No rule allows {TARGET}" in body
    assert "Nothing was queued for review, so there is nothing waiting to be decided" in body
    assert "access needs an allow rule added to the policy" in body


def test_pending_carries_id_retry_after_and_how_to_justify() -> None:
    refusal = render_refusal(PENDING, FACTS, "p-42", approval_wait=30.0)
    headers = dict(refusal.headers)
    assert refusal.status == 403
    assert refusal.reason_phrase.endswith(f"{TARGET} is waiting for approval (pending id p-42)")
    assert headers["X-Egress-Warden-Pending-Id"] == "p-42"
    assert headers["Retry-After"] == "30"
    assert "pending id: p-42" in _flat(refusal.body)
    assert "once an approver approves item p-42, the retry passes" in _flat(refusal.body)
    assert "Retry-After: 30 seconds" in _flat(refusal.body)
    assert "X-Egress-Warden-Justification: <one short line>" in _flat(refusal.body)
    assert "egress-warden approve p-42" in _flat(refusal.body)


def test_pending_retry_after_is_a_few_seconds_when_nothing_waits() -> None:
    assert _headers(PENDING, approval_wait=0.0)["Retry-After"] == "5"
    assert _headers(PENDING, approval_wait=1.2)["Retry-After"] == "2"


def test_approval_denied_names_approver_and_note() -> None:
    body = _flat(render_refusal(DENIED, FACTS, "p-77").body)
    assert "An approver refused the request" in body
    assert "denied by alice (scope once): not needed for this task" in body
    assert "Retrying the same request will not change that answer" in body


def test_approval_limit_says_no_item_was_made_and_retrying_now_fails() -> None:
    refusal = render_refusal(LIMIT, FACTS)
    assert refusal.status == 403
    assert "no pending item was made" in _flat(refusal.body)
    assert "agent has 20 pending items" in _flat(refusal.body)
    assert "Retrying now will be refused the same way" in _flat(refusal.body)
    assert "Retry-After" not in dict(refusal.headers)


def test_approval_unavailable_says_retry_in_a_few_seconds() -> None:
    refusal = render_refusal(UNAVAILABLE, FACTS)
    assert "retry this one in a few seconds" in _flat(refusal.body)
    assert dict(refusal.headers)["Retry-After"] == "5"


def test_auth_is_407_with_a_credential_form_that_parses_in_a_proxy_url() -> None:
    refusal = render_refusal(AUTH, FACTS)
    headers = dict(refusal.headers)
    assert refusal.status == 407
    assert headers["Proxy-Authenticate"] == 'Basic realm="egress-warden"'
    assert "HTTPS_PROXY=http://AGENT:TOKEN@PROXY_HOST:PORT" in _flat(refusal.body)
    assert "--proxy-user AGENT:TOKEN" in _flat(refusal.body)
    assert "http://AGENT~SESSION:TOKEN@PROXY_HOST:PORT" in _flat(refusal.body)
    assert "AGENT/" not in _flat(refusal.body)  # a '/' in the userinfo breaks a proxy URL


def test_dns_failure_is_502_and_says_no_access_request_helps() -> None:
    refusal = render_refusal(DNS, FACTS)
    assert refusal.status == 502
    assert refusal.reason_phrase == f"Egress failed: {TARGET} could not be resolved"
    assert "could not resolve paste.pastebin.test" in _flat(refusal.body)
    assert "No access request helps" in _flat(refusal.body)


def test_host_mismatch_says_the_request_is_always_refused() -> None:
    refusal = render_refusal(MISMATCH, FACTS)
    assert refusal.status == 403
    assert "names two different destinations" in _flat(refusal.body)
    assert "always refused" in _flat(refusal.body)


@pytest.mark.parametrize(
    ("decision", "status", "phrase"),
    [
        (INVALID_HOST, 403, "not a valid host name"),
        (INVALID_REQUEST, 403, "The request is malformed (malformed ClientHello)"),
        (INVALID_METHOD, 400, "The request is malformed (not an HTTP token)"),
    ],
)
def test_invalid_requests_say_fix_the_request(decision: Decision, status: int, phrase: str) -> None:
    refusal = render_refusal(decision, FACTS)
    assert refusal.status == status
    assert phrase in _flat(refusal.body)


def test_revoked_says_a_new_request_is_decided_afresh() -> None:
    body = _flat(render_refusal(REVOKED, FACTS).body)
    assert "what admitted it no longer does (the grant that admitted it is gone)" in body
    assert "decided under the rules in force now" in body


@pytest.mark.parametrize("decision", [d for d in ALL if d.reason in NEVER_APPROVABLE])
def test_unapprovable_bodies_never_mention_approving_or_pending(decision: Decision) -> None:
    for variant in (FACTS, replace_port(8443)):
        body = _flat(render_refusal(decision, variant, "p-1").body).lower()
        assert "approv" not in body
        assert "pending" not in body
        document = _json(decision, "p-1")
        assert document["pending_id"] is None
        help_text = str(document["help"]).lower()
        assert "approv" not in help_text and "pending" not in help_text


def test_never_approvable_covers_the_reasons_the_spec_names() -> None:
    for reason in (Reason.DENY_RULE, Reason.PORT, Reason.PRIVATE_NETWORK, Reason.HOST_MISMATCH):
        assert reason in NEVER_APPROVABLE


@pytest.mark.parametrize("decision", ALL)
def test_every_reason_has_its_own_message(decision: Decision) -> None:
    others = [d for d in ALL if d is not decision]
    mine = _json(decision, "p-9")["help"]
    assert all(_json(other, "p-9")["help"] != mine for other in others)
    assert f"{decision.reason.value} is refused" not in str(mine)  # not the generic fallback


# -- machine-readable ---------------------------------------------------------------------------


def test_json_body_has_every_field() -> None:
    refusal = render_refusal(PENDING, FACTS, "p-42", accept="application/json", approval_wait=7)
    assert dict(refusal.headers)["Content-Type"] == "application/json"
    document = json.loads(refusal.body)
    assert document == {
        "reason": "approval_pending",
        "message": f"{TARGET} is waiting for approval (pending id p-42)",
        "destination": TARGET,
        "rule": None,
        "source": None,
        "pending_id": "p-42",
        "request_id": "0123456789abcdef",
        "retry_after": 7,
        "help": document["help"],
    }
    assert "p-42" in document["help"]


def test_json_deny_rule_carries_rule_and_source() -> None:
    document = _json(DENY_RULE)
    assert document["reason"] == "deny_rule"
    assert document["rule"] == "**.pastebin.test"
    assert document["source"] == "/etc/ew/policy.yaml:12"
    assert document["retry_after"] is None


def test_text_is_the_default() -> None:
    for accept in (None, "", "*/*", "text/plain", "text/html", "application/json;q=0"):
        refusal = render_refusal(DENY_RULE, FACTS, accept=accept)
        assert dict(refusal.headers)["Content-Type"] == "text/plain; charset=utf-8"
        assert refusal.body.startswith("egress-warden: blocked by egress policy:")


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("text/plain;q=0.5, application/json", True),
        ("application/json;q=0.4, text/plain", False),
        ("text/*, application/json;q=0.9", False),
        ("application/json;q=bogus", False),
        ("*/*", False),
    ],
)
def test_wants_json(accept: str, expected: bool) -> None:
    assert wants_json(accept) is expected


# -- the organisation's words --------------------------------------------------------------------

WORDS = RefusalSettings(contact="#egress-help on chat", help_url="https://wiki.example/egress")


@pytest.mark.parametrize("decision", ALL)
def test_contact_and_help_url_in_every_body(decision: Decision) -> None:
    body = _flat(render_refusal(decision, FACTS, settings=WORDS).body)
    assert "Who to ask: #egress-help on chat" in body
    assert "More help: https://wiki.example/egress" in body
    document = _json(decision, settings=WORDS)
    assert document["contact"] == "#egress-help on chat"
    assert document["help_url"] == "https://wiki.example/egress"


def test_no_contact_keys_when_unset() -> None:
    document = _json(DENY_RULE)
    assert "contact" not in document and "help_url" not in document
    assert "Who to ask" not in _flat(render_refusal(DENY_RULE, FACTS).body)


def replace_port(port: int) -> RequestFacts:
    from dataclasses import replace

    return replace(FACTS, port=port)


# -- the documented contract --------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "refusals.md"
NOT_REFUSALS = {
    Reason.ALLOW_RULE,
    Reason.DEFAULT_ALLOW,
    Reason.DEFAULT_ASK,
    Reason.WOULD_DENY,
    Reason.APPROVED,
}


def _schema() -> dict[str, Any]:
    text = DOCS.read_text()
    block = text.split('```json\n{\n  "$schema"', 1)[1].split("```", 1)[0]
    schema: dict[str, Any] = json.loads('{\n  "$schema"' + block)
    return schema


@pytest.mark.parametrize("decision", ALL)
def test_json_bodies_match_the_documented_schema(decision: Decision) -> None:
    schema = _schema()
    for settings in (None, WORDS):
        document = _json(decision, "p-3", settings=settings, approval_wait=3)
        assert set(schema["required"]) <= set(document) <= set(schema["properties"])
        assert document["reason"] in schema["properties"]["reason"]["enum"]
        for name, value in document.items():
            kinds = schema["properties"][name].get("type")
            if kinds is None:
                continue
            kinds = [kinds] if isinstance(kinds, str) else kinds
            python = {"string": str, "integer": int, "null": type(None)}
            assert any(isinstance(value, python[kind]) for kind in kinds), name


def test_docs_list_every_refusal_reason() -> None:
    refused = {reason.value for reason in Reason} - {reason.value for reason in NOT_REFUSALS}
    assert set(_schema()["properties"]["reason"]["enum"]) == refused
    table = DOCS.read_text()
    for reason in refused:
        assert f"| `{reason}` |" in table, reason
