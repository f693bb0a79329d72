"""Policy files: validation with FILE:LINE errors, and merging several files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.hosts import Host
from proxy.policy.load import PolicyError, PolicyErrors, load_policies, load_policy_file, merge
from proxy.policy.model import DefaultAction, Mode, Scope, min_default, parse_duration

SPEC_EXAMPLE = """\
version: 1
mode: enforce            # enforce | audit (audit: allow everything, record would-deny)
default: ask             # allow | deny | ask   - for destinations no rule matches
allow:
  - github.com                 # exact host, any allowed port
  - "*.githubusercontent.com"  # one or more labels below; NOT the apex
  - "**.example.org"           # the apex and every subdomain
  - "ec2.*.amazonaws.com"      # '*' inside a label: any characters of that one label
  - "api.example.com:8443"     # host with a port
  - 10.20.0.0/16               # IP or CIDR; also lifts the private-network block for it
deny:
  - "**.pastebin.com"
network:
  ports: [80, 443]             # ports allowed when a rule names none
  block_private: true
approval:
  wait: 30s                    # how long a request is held before it is answered 403 pending
  pending_ttl: 1h              # how long an unanswered item stays; a retry after approval passes
  scopes: [once, session, always]
inspect:                       # optional: TLS interception for method/path rules on these hosts
  - host: api.github.com
    methods: [GET, HEAD]
    deny_paths: ["/repos/*/*/git/refs*"]
agents:                        # per-agent overrides, keyed by the authenticated agent id
  ci-bot: { default: deny, allow: [github.com] }
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors_of(path: Path) -> list[PolicyError]:
    with pytest.raises(PolicyErrors) as info:
        load_policy_file(path)
    return info.value.errors


def test_spec_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE)
    policy = load_policies([path])
    assert policy.mode is Mode.ENFORCE
    assert policy.default is DefaultAction.ASK
    assert len(policy.allow) == 6 and len(policy.deny) == 1
    assert policy.ports == frozenset({80, 443})
    assert policy.block_private is True
    assert policy.approval.wait == 30.0 and policy.approval.pending_ttl == 3600.0
    assert policy.approval.scopes == frozenset(Scope)
    assert policy.files == (str(path),)
    rule = policy.allow.match(Host("raw.githubusercontent.com"), 443)
    assert rule is not None and rule.source == f"{path}:6"
    api = policy.allow.match(Host("api.example.com"), 8443)
    assert api is not None and api.port == 8443
    assert policy.deny.match(Host("pastebin.com"), 443) is not None
    (inspect,) = policy.inspect
    assert inspect.host == "api.github.com"
    assert inspect.methods == frozenset({"GET", "HEAD"})
    assert inspect.deny_paths == ("/repos/*/*/git/refs*",)
    assert inspect.source == f"{path}:21"
    assert policy.inspect_rule(Host("api.github.com"), 443) == inspect
    assert policy.inspect_rule(Host("github.com"), 443) is None
    bot = policy.agents["ci-bot"]
    assert bot.default is DefaultAction.DENY and len(bot.allow) == 1
    assert policy.default_for("ci-bot") is DefaultAction.DENY
    assert policy.default_for("other") is DefaultAction.ASK


def test_defaults_when_keys_are_absent(tmp_path: Path) -> None:
    policy = load_policies([write(tmp_path, "version: 1\n")])
    assert policy.mode is Mode.ENFORCE
    assert policy.default is DefaultAction.ASK
    assert policy.ports == frozenset({80, 443})
    assert policy.block_private is True
    assert policy.approval.wait == 30.0 and policy.approval.pending_ttl == 3600.0
    assert policy.approval.scopes == frozenset(Scope)
    assert len(policy.allow) == 0 and policy.inspect == () and dict(policy.agents) == {}


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("version: 1\nallow: [a.com]\nalow: [b.com]\n", 3, "unknown key 'alow'"),
        ("version: 1\nnetwork:\n  ports: [443]\n  blockprivate: false\n", 4, "'blockprivate'"),
        ("version: 1\nallow:\n  - github.com\n  - '*'\n", 4, "allow[1]: invalid pattern '*'"),
        (
            "version: 1\nallow:\n  - github.com\n  - a.com\n  - '*.com'\n",
            5,
            "allow[2]: invalid pattern '*.com': a wildcard needs at least two fixed labels"
            " to its right",
        ),
        ("version: 1\ndeny:\n  - a.*b*.c\n", 3, "deny[0]: invalid pattern 'a.*b*.c'"),
        ("version: 1\nallow:\n  - 10.0.0.1/16\n", 3, "host bits set"),
        ("version: 1\nallow:\n  - x.com:70000\n", 3, "port '70000'"),
        ("version: 1\nnetwork:\n  ports: [80, 0]\n", 3, "network.ports[1]"),
        ("version: 1\napproval:\n  wait: soon\n", 3, "approval.wait: invalid duration 'soon'"),
        ("version: 1\nallow: [a.com\ndeny: []\n", 3, "YAML syntax error"),
        ("mode: audit\nallow: [a.com]\n", 1, "missing required key 'version'"),
        ("version: 2\n", 1, "version: must be 1"),
        ("version: 1\nmode: strict\n", 2, "mode: Input should be 'enforce' or 'audit'"),
        ("version: 1\nagents:\n  bot:\n    default: maybe\n", 4, "agents.bot.default"),
        ("version: 1\nagents:\n  bot: {allow: ['**']}\n", 3, "agents.bot.allow[0]"),
        ("version: 1\ninspect:\n  - host: '*.com'\n", 3, "inspect[0].host"),
        ("version: 1\ninspect:\n  - host: a.com\n    deny_paths: [x]\n", 4, "must start with '/'"),
        ("version: 1\nallow: [a.com]\nallow: [b.com]\n", 3, "duplicate key 'allow'"),
        ("", 1, "empty policy file"),
        ("- a\n- b\n", 1, "top level must be a mapping"),
    ],
)
def test_error_reports_file_and_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path, text)
    errors = errors_of(path)
    assert any(e.line == line and fragment in e.message for e in errors), errors
    assert all(e.file == str(path) for e in errors)
    assert str(errors[0]).startswith(f"{path}:{errors[0].line}: ")


def test_every_error_in_a_file_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        version: 1
        mode: enforse
        allow:
          - github.com
          - "*.com"
          - a.*b*.c
        network:
          ports: [99999]
          colour: blue
        approval:
          pending_ttl: 3 weeks
        """,
    )
    with pytest.raises(PolicyErrors) as info:
        load_policy_file(path)
    found = [(e.line, e.message.split(":")[0]) for e in info.value.errors]
    assert found == [
        (2, "mode"),
        (5, "allow[1]"),
        (6, "allow[2]"),
        (8, "network.ports[0]"),
        (9, "unknown key 'colour' under 'network'; expected one of"),
        (11, "approval.pending_ttl"),
    ]
    assert str(info.value).count("\n") == 5


def test_missing_file_is_an_error_on_line_zero(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyErrors) as info:
        load_policies([missing])
    (error,) = info.value.errors
    assert (error.file, error.line) == (str(missing), 0)


def test_errors_of_all_files_are_aggregated(tmp_path: Path) -> None:
    first = write(tmp_path, "version: 1\nallow: ['*']\n", "a.yaml")
    second = write(tmp_path, "version: 1\nmode: nope\n", "b.yaml")
    with pytest.raises(PolicyErrors) as info:
        load_policies([first, second])
    assert [(e.file, e.line) for e in info.value.errors] == [(str(first), 2), (str(second), 2)]


def test_merge_unions_lists_and_last_set_scalar_wins(tmp_path: Path) -> None:
    base = write(
        tmp_path,
        """\
        version: 1
        mode: audit
        default: deny
        allow: [github.com]
        deny: ["**.pastebin.com"]
        network: {ports: [443, 8443], block_private: false}
        approval: {wait: 5s, scopes: [once]}
        inspect: [{host: api.github.com}]
        agents:
          bot: {default: allow, allow: [a.example.com]}
          other: {deny: [b.example.com]}
        """,
        "base.yaml",
    )
    overlay = write(
        tmp_path,
        """\
        version: 1
        default: ask
        allow: [index.packages.test]
        network: {ports: [443]}
        approval: {pending_ttl: 10m}
        inspect: [{host: uploads.github.com, methods: [post]}]
        agents:
          bot: {allow: [c.example.com]}
        """,
        "overlay.yaml",
    )
    policy = merge([load_policy_file(base), load_policy_file(overlay)])
    assert policy.mode is Mode.AUDIT  # overlay does not set it
    assert policy.default is DefaultAction.ASK  # overlay sets it
    assert [r.pattern for r in policy.allow.rules] == ["github.com", "index.packages.test"]
    assert [r.pattern for r in policy.deny.rules] == ["**.pastebin.com"]
    assert policy.ports == frozenset({443})
    assert policy.block_private is False  # only base sets it
    assert policy.approval.wait == 5.0
    assert policy.approval.pending_ttl == 600.0
    assert policy.approval.scopes == frozenset({Scope.ONCE})
    assert [i.host for i in policy.inspect] == ["api.github.com", "uploads.github.com"]
    assert policy.inspect[1].methods == frozenset({"POST"})
    bot = policy.agents["bot"]
    assert bot.default is DefaultAction.ALLOW  # overlay leaves the agent's default unset
    assert [r.pattern for r in bot.allow.rules] == ["a.example.com", "c.example.com"]
    assert bot.allow.rules[1].source == f"{overlay}:8"
    assert policy.agents["other"].default is None
    assert policy.files == (str(base), str(overlay))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), (12, 12.0)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "-1s", "1w", True, -3])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_default_ordering() -> None:
    assert min_default(DefaultAction.ALLOW, DefaultAction.ASK) is DefaultAction.ASK
    assert min_default(DefaultAction.ASK, DefaultAction.DENY) is DefaultAction.DENY
    assert (
        DefaultAction.DENY.looseness < DefaultAction.ASK.looseness < DefaultAction.ALLOW.looseness
    )


def test_telemetry_section_maps_to_otel_variables(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "version: 1\ntelemetry:\n  endpoint: http://collector:4317\n  protocol: http/protobuf\n"
        "  headers: {authorization: Bearer x}\n  service_name: warden\n"
        "  resource_attributes: {env: prod, team: sec}\n"
    )
    policy = load_policies([path])
    assert dict(policy.telemetry) == {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer x",
        "OTEL_SERVICE_NAME": "warden",
        "OTEL_RESOURCE_ATTRIBUTES": "env=prod,team=sec",
    }


def test_telemetry_section_rejects_unknown_protocol(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("version: 1\ntelemetry:\n  protocol: carrier-pigeon\n")
    with pytest.raises(PolicyErrors) as info:
        load_policies([path])
    assert f"{path}:3:" in str(info.value)
