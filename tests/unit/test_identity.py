"""Claimed identities: ids must fully match, only verified agents are agents, one failure text,
per-agent policy needs a registry, and a grant "for the agent" needs an agent."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.agents import AgentRegistry, AgentsFileError
from proxy.approvals import ApprovalError, ApprovalQueue, Outcome
from proxy.auth import (
    CREDENTIALS_REQUIRED,
    INVALID_CREDENTIALS,
    Authenticator,
    Caller,
    check_identity_config,
)
from proxy.eventbus import EventBus
from proxy.grants import GrantIndex
from proxy.identity import Identity, parse_proxy_authorization
from proxy.policy.load import load_policies
from proxy.policy.model import EffectivePolicy, Scope
from proxy.policy.requirements import load_effective
from proxy.records import GrantFor, PendingItem
from proxy.store.sqlite import SqliteStore
from proxy.telemetry import Telemetry


def _basic(user: str, password: str = "tok") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- parsing: ids fully match their pattern ------------------------------------------------------


@pytest.mark.parametrize(
    "user",
    [
        "trusted-bot\n",
        "trusted-bot/s1\n",
        "trusted-bot\n/s1",
        "trusted-bot\r\n",
        "trusted-bot ",
        "\ntrusted-bot",
        "trusted-bot\x00",
        "a" * 129,
        "",
        "/s1",
        "trusted-bot/s1/s2",
    ],
)
def test_malformed_ids_are_not_identities(user: str) -> None:
    assert parse_proxy_authorization(_basic(user)) is None


def test_well_formed_ids_parse() -> None:
    assert parse_proxy_authorization(_basic("trusted-bot")) == Identity("trusted-bot", None, "tok")
    assert parse_proxy_authorization(_basic("a" * 128 + "/run-42", "x:y")) == Identity(
        "a" * 128, "run-42", "x:y"
    )


@pytest.mark.parametrize("agent", ["trusted-bot\n", "bad id", "-leading-dash", ""])
def test_registry_refuses_ids_that_do_not_fully_match(tmp_path: Path, agent: str) -> None:
    registry = AgentRegistry(tmp_path / "agents.yaml")
    with pytest.raises(AgentsFileError):
        registry.add(agent)
    agents = tmp_path / "loaded.yaml"
    # a double-quoted YAML key, so "\n" in it is a real newline
    agents.write_text(f"version: 1\nagents:\n  {json.dumps(agent)}: {{salt: '00', hash: '00'}}\n")
    with pytest.raises(AgentsFileError, match="invalid agent id"):
        AgentRegistry.load(agents)


# --- authentication -----------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> tuple[AgentRegistry, str]:
    registry = AgentRegistry(tmp_path / "agents.yaml")
    return registry, registry.add("trusted-bot")


def test_unknown_agent_and_wrong_token_fail_with_the_same_text(
    registry: tuple[AgentRegistry, str],
) -> None:
    reg, token = registry
    for required in (True, False):
        auth = Authenticator(reg, required=required)
        unknown = auth.identify(Identity("unknown-bot", None, token))
        wrong = auth.identify(Identity("trusted-bot", None, token + "x"))
        assert unknown == wrong == Caller(failure=INVALID_CREDENTIALS)
        assert auth.identify(Identity("trusted-bot", "s1", token)) == Caller("trusted-bot", "s1")


def test_missing_credentials_fail_only_when_required(registry: tuple[AgentRegistry, str]) -> None:
    reg, _ = registry
    assert Authenticator(reg, required=True).identify(None) == Caller(failure=CREDENTIALS_REQUIRED)
    assert Authenticator(reg, required=False).identify(None) == Caller()


def test_without_a_registry_a_claimed_id_is_anonymous() -> None:
    claimed = Identity("trusted-bot", "s1", "anything")
    assert Authenticator().identify(claimed) == Caller()
    assert Authenticator(None, required=False).identify(claimed) == Caller()
    # required with nothing to verify against: nobody gets in under a name
    assert Authenticator(None, required=True).identify(claimed) == Caller(
        failure=INVALID_CREDENTIALS
    )


# --- start-up: per-agent sections need a registry -------------------------------------------------

PER_AGENT = """\
version: 1
default: deny
agents:
  trusted-bot: {default: allow}
"""


def _policy(tmp_path: Path, text: str) -> EffectivePolicy:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return load_policies([path])


def test_per_agent_sections_without_a_registry_are_refused(tmp_path: Path) -> None:
    policy = _policy(tmp_path, PER_AGENT)
    message = check_identity_config(policy, None)
    assert message is not None
    assert "'trusted-bot'" in message and "no agents file is configured" in message
    assert "egress-warden agents add" in message


def test_per_agent_sections_with_a_missing_agents_file_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "agents.yaml"
    message = check_identity_config(_policy(tmp_path, PER_AGENT), missing)
    assert message is not None and str(missing) in message and "does not exist" in message


def test_per_agent_sections_with_a_registry_are_accepted(
    tmp_path: Path, registry: tuple[AgentRegistry, str]
) -> None:
    reg, _ = registry
    assert reg.path is not None and reg.path.is_file()
    assert check_identity_config(_policy(tmp_path, PER_AGENT), reg.path) is None


def test_a_policy_without_per_agent_sections_needs_no_registry(tmp_path: Path) -> None:
    policy = _policy(tmp_path, "version: 1\ndefault: ask\nallow: [github.com]\n")
    assert check_identity_config(policy, None) is None
    assert check_identity_config(policy, tmp_path / "missing.yaml") is None


def test_per_agent_sections_in_the_requirements_count_too(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefault: ask\n")
    floor = tmp_path / "req.yaml"
    floor.write_text("version: 1\nagents:\n  ci-bot: {deny: [paste.example.com]}\n")
    effective, _ = load_effective([policy], floor)
    message = check_identity_config(effective, None)
    assert message is not None and "'ci-bot'" in message


def test_many_per_agent_sections_are_named_briefly(tmp_path: Path) -> None:
    sections = "".join(f"  bot-{i:02}: {{default: allow}}\n" for i in range(12))
    message = check_identity_config(_policy(tmp_path, f"version: 1\nagents:\n{sections}"), None)
    assert message is not None and "'bot-04'" in message and "'bot-05'" not in message
    assert "and 7 more" in message


# --- approvals: "for agent" needs an agent --------------------------------------------------------


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[tuple[ApprovalQueue, SqliteStore]]:
    store = await SqliteStore.open(tmp_path / "state" / "warden.db")
    queue = ApprovalQueue(store, GrantIndex(), Telemetry([]), EventBus())
    await queue.start()
    yield queue, store
    await store.close()


async def _pending(store: SqliteStore, item_id: str, agent: str | None) -> PendingItem:
    now = time.time()
    item = PendingItem(
        id=item_id,
        host=f"{item_id}.example.com",
        port=443,
        scheme="https",
        method="CONNECT",
        agent=agent,
        session=None,
        first_seen=now,
        last_seen=now,
        count=1,
        expires_at=now + 3600,
    )
    joined, created = await store.join_pending(item)
    assert created
    return joined


async def _approve(
    queue: ApprovalQueue, item_id: str, grant_for: GrantFor | None, scope: Scope = Scope.ALWAYS
) -> GrantFor:
    result = await queue.resolve(
        item_id,
        Outcome.APPROVED,
        scope=scope,
        grant_for=grant_for,
        note="",
        approver="admin",
        allowed_scopes=frozenset(Scope),
    )
    return result.verdict.grant_for


@pytest.mark.parametrize("scope", list(Scope))
async def test_for_agent_on_an_item_without_agent_is_refused_and_the_item_stays(
    queue: tuple[ApprovalQueue, SqliteStore], scope: Scope
) -> None:
    approvals, store = queue
    await _pending(store, "anon", None)
    with pytest.raises(ApprovalError) as refused:
        await _approve(approvals, "anon", GrantFor.AGENT, scope)
    assert refused.value.code == "for_agent_without_agent"
    assert '"for": "all"' in refused.value.detail
    assert await store.get_pending("anon") is not None  # not claimed: still answerable
    assert await _approve(approvals, "anon", GrantFor.ALL, scope) is GrantFor.ALL


async def test_for_agent_is_refused_when_only_the_store_knows_the_item(
    queue: tuple[ApprovalQueue, SqliteStore],
) -> None:
    approvals, store = queue
    await _pending(store, "elsewhere", None)  # joined on another replica: not cached here
    with pytest.raises(ApprovalError, match="no authenticated agent"):
        await _approve(approvals, "elsewhere", GrantFor.AGENT)


async def test_unspecified_for_covers_the_items_agent_or_all(
    queue: tuple[ApprovalQueue, SqliteStore],
) -> None:
    approvals, store = queue
    await _pending(store, "named", "trusted-bot")
    await _pending(store, "anon", None)
    assert await _approve(approvals, "named", None) is GrantFor.AGENT
    assert await _approve(approvals, "anon", None) is GrantFor.ALL
    grants = {g.pattern: g.agent for g in approvals._grants.all()}
    assert grants == {"named.example.com:443": "trusted-bot", "anon.example.com:443": None}


async def test_for_agent_on_an_item_with_an_agent_grants_to_that_agent(
    queue: tuple[ApprovalQueue, SqliteStore],
) -> None:
    approvals, store = queue
    await _pending(store, "named", "trusted-bot")
    assert await _approve(approvals, "named", GrantFor.AGENT) is GrantFor.AGENT
    assert [g.agent for g in approvals._grants.all()] == ["trusted-bot"]


async def test_a_policy_change_still_resolves_items_without_agent(
    queue: tuple[ApprovalQueue, SqliteStore],
) -> None:
    approvals, store = queue
    await _pending(store, "anon", None)
    assert await approvals.reevaluate(lambda item: Outcome.APPROVED) == 1
    assert await store.get_pending("anon") is None


async def test_an_unknown_item_is_still_not_found(queue: tuple[ApprovalQueue, SqliteStore]) -> None:
    approvals, _ = queue
    with pytest.raises(ApprovalError) as missing:
        await _approve(approvals, "nope", GrantFor.AGENT)
    assert missing.value.code == "not_found"


# --- the session separator: `~` stands unencoded in a proxy URL ----------------------------------


@pytest.mark.parametrize(
    ("user", "agent", "session"),
    [
        ("ci-bot~run-42", "ci-bot", "run-42"),
        ("ci-bot/run-42", "ci-bot", "run-42"),  # `%2F` in the URL arrives decoded as `/`
        ("a@b.example~s.1", "a@b.example", "s.1"),
        ("ci-bot", "ci-bot", None),
    ],
)
def test_tilde_and_slash_both_separate_the_session(
    user: str, agent: str, session: str | None
) -> None:
    assert parse_proxy_authorization(_basic(user)) == Identity(agent, session, "tok")


@pytest.mark.parametrize(
    "user", ["ci-bot~", "ci-bot/", "~run-42", "ci-bot~run~42", "ci-bot~run/42", "ci-bot~run 42"]
)
def test_empty_or_doubled_session_parts_are_not_identities(user: str) -> None:
    assert parse_proxy_authorization(_basic(user)) is None


def test_the_separator_needs_no_percent_encoding_in_a_url_userinfo() -> None:
    from urllib.parse import quote, urlsplit

    from proxy.identity import SESSION_SEPARATOR, proxy_url

    # RFC 3986 unreserved: every URL library leaves it as it is, and ids never contain it.
    assert quote(SESSION_SEPARATOR, safe="") == SESSION_SEPARATOR
    assert not re_id_allows(SESSION_SEPARATOR)
    url = proxy_url("http://127.0.0.1:8080", "ci-bot", "run-42", "t0k-_")
    assert url == "http://ci-bot~run-42:t0k-_@127.0.0.1:8080"
    parts = urlsplit(url)
    assert (parts.username, parts.password, parts.hostname, parts.port) == (
        "ci-bot~run-42",
        "t0k-_",
        "127.0.0.1",
        8080,
    )


def test_an_at_sign_in_an_id_is_percent_encoded_in_the_url() -> None:
    from urllib.parse import unquote, urlsplit

    from proxy.identity import proxy_url

    url = proxy_url("http://proxy.example:3128", "bot@team", "s1", "t")
    assert url == "http://bot%40team~s1:t@proxy.example:3128"
    parts = urlsplit(url)
    assert parts.hostname == "proxy.example"
    user = unquote(parts.username or "")
    assert parse_proxy_authorization(_basic(user, "t")) == Identity("bot@team", "s1", "t")


def test_proxy_url_without_an_agent_is_the_proxy() -> None:
    from proxy.identity import proxy_url

    assert proxy_url("http://127.0.0.1:8080", None, "s1", "t") == "http://127.0.0.1:8080"
    assert proxy_url("127.0.0.1:8080", "a", None, None) == "http://a@127.0.0.1:8080"


def re_id_allows(text: str) -> bool:
    from proxy.identity import _ID

    return any(_ID.fullmatch("a" + ch) for ch in text)
