"""Policy data: the pydantic schema of one policy file and the compiled effective policy."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from proxy.hosts import Host
    from proxy.policy.match import ParsedPattern, RuleSet


class Mode(StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"  # allow everything, record what would have been denied


class DefaultAction(StrEnum):
    """What happens to a destination no rule matches. Ordered deny < ask < allow."""

    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"

    @property
    def looseness(self) -> int:
        """0 for deny, 1 for ask, 2 for allow: compare to cap a default."""
        return _LOOSENESS[self]


_LOOSENESS = {DefaultAction.DENY: 0, DefaultAction.ASK: 1, DefaultAction.ALLOW: 2}


def min_default(*defaults: DefaultAction) -> DefaultAction:
    """The tightest of `defaults` (deny < ask < allow)."""
    return min(defaults, key=lambda d: d.looseness)


class Scope(StrEnum):
    ONCE = "once"
    SESSION = "session"
    ALWAYS = "always"


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class ScanMode(StrEnum):
    """Credential scanning of an inspected host's requests."""

    OFF = "off"
    REPORT = "report"  # an event, the request goes on
    ENFORCE = "enforce"  # refused `secret_detected`


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow/deny entry as written, with where it came from."""

    pattern: str  # as written in the file
    action: Action
    source: str  # "file:line", or a grant id for runtime grants
    port: int | None = None  # the pattern's port, if it names one


@dataclass(frozen=True)
class ApprovalSettings:
    wait: float = 30.0  # seconds a request is held before answering 403 approval_pending
    pending_ttl: float = 3600.0  # seconds an unanswered pending item lives
    scopes: frozenset[Scope] = frozenset(Scope)
    session_idle: float = 8 * 3600.0  # a session grant ends this long after it was made
    # a used `once` approval also admits what the same agent session sends from the same
    # client address to the same host:port this long after it (one client operation: git's
    # smart HTTP GETs, then POSTs); 0: off
    once_window: float = 10.0
    max_pending: int = 20  # new pending items beyond this per agent: 403 approval_limit
    max_pending_total: int = 1000  # ... and beyond this in all
    # auto-review before humans (proxy/review): the reviewers in order, and what they may grant
    review: tuple[ReviewerSection, ...] = ()
    auto: AutoApproveSection = field(default_factory=lambda: AutoApproveSection())
    # webhooks told when an item is held or resolved (proxy/approvals/notify.py)
    notify: tuple[NotifyTargetSection, ...] = ()
    console_url: str | None = None  # the console's address as approvers reach it (for links)


@dataclass(frozen=True)
class RefusalSettings:
    """The organisation's words added to every refusal body: who to ask, and a link."""

    contact: str | None = None
    help_url: str | None = None


@dataclass(frozen=True)
class InspectRule:
    """TLS interception with method/path checks for one host pattern."""

    host: str  # canonical host pattern
    methods: frozenset[str] | None  # upper-case; None = every method
    deny_paths: tuple[str, ...]  # glob patterns on the URL path
    source: str
    scan: ScanMode = ScanMode.ENFORCE  # credential scanning of its requests (proxy/secrets)


@dataclass(frozen=True)
class SecretRule:
    """One brokered credential (`secrets:`): where its value comes from, the hosts it belongs
    to (intercepted, and the only ones it is injected for) and how it is injected."""

    id: str
    hosts: tuple[str, ...]  # canonical host patterns
    source: str  # "file:line"
    env: str | None = None  # the proxy's environment variable holding the value
    file: str | None = None  # or a file holding it (resolved against the policy file)
    header: str | None = None  # inject into this header...
    format: str = "{value}"  # ...written like this
    basic_user: str | None = None  # or as the password of HTTP basic auth (None: not basic)
    env_name: str | None = None  # the agent's variable for the placeholder (`egress-warden env`)


@dataclass(frozen=True)
class AgentPolicy:
    """Per-agent overrides: extra rules, and optionally its own default."""

    default: DefaultAction | None
    allow: RuleSet
    deny: RuleSet


@dataclass(frozen=True)
class Floor:
    """What a requirements file imposes, kept apart so audit mode can tell it from the policy's
    own rules: its deny rules, its port cap, and its mode (a `mode: audit` in the requirements
    file is the only thing that softens these)."""

    deny: RuleSet
    agents_deny: Mapping[str, RuleSet]
    ports: frozenset[int] | None  # None: the requirements set no port cap
    default_cap: DefaultAction | None  # the default was capped to this (managed_only: deny)
    mode: Mode = Mode.ENFORCE


@dataclass(frozen=True)
class EffectivePolicy:
    """The merged, compiled policy in force."""

    mode: Mode
    default: DefaultAction
    allow: RuleSet
    deny: RuleSet
    ports: frozenset[int]
    block_private: bool
    approval: ApprovalSettings
    inspect: tuple[InspectRule, ...]
    agents: Mapping[str, AgentPolicy]
    files: tuple[str, ...]
    # `telemetry:` settings as the standard OTEL_* variables they stand for
    telemetry: Mapping[str, str] = field(default_factory=dict)
    max_tunnel_lifetime: float | None = None  # seconds; None: tunnels live as long as used
    managed_only: bool = False  # set by a requirements file: only its allows count, no asking
    agents_file: str | None = None  # `auth.agents_file`, resolved against its policy file
    auth_required: bool | None = None  # `auth.required`; None: required iff agents are configured
    mode_pinned: bool = False  # a requirements file set the mode: nothing may switch it
    floor: Floor | None = None  # the requirements' part, when a requirements file is in force
    refusal: RefusalSettings = field(default_factory=RefusalSettings)  # `refusal:` section
    secrets: tuple[SecretRule, ...] = ()  # `secrets:`; their hosts are also under `inspect`
    _inspect_index: RuleSet = field(init=False, repr=False, compare=False)
    _inspect_by_source: Mapping[str, InspectRule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from proxy.policy.match import RuleSet  # model is imported by match: avoid the cycle

        object.__setattr__(self, "agents", MappingProxyType(dict(self.agents)))
        by_source = {f"{i}:{r.source}": r for i, r in enumerate(self.inspect)}
        index = RuleSet.build(
            Rule(pattern=r.host, action=Action.ALLOW, source=key) for key, r in by_source.items()
        )
        object.__setattr__(self, "_inspect_index", index)
        object.__setattr__(self, "_inspect_by_source", MappingProxyType(by_source))

    def default_for(self, agent: str | None) -> DefaultAction:
        """The default for `agent`: its own if it sets one, else the policy's."""
        if agent is not None:
            agent_policy = self.agents.get(agent)
            if agent_policy is not None and agent_policy.default is not None:
                return agent_policy.default
        return self.default

    def inspect_rule(self, host: Host, port: int) -> InspectRule | None:
        """The most specific `inspect` entry covering `host`, if any."""
        rule = self._inspect_index.match(host, port)
        return None if rule is None else self._inspect_by_source[rule.source]


# --- schema of one policy file -------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_METHOD = re.compile(r"[A-Z]+")


def parse_duration(value: object) -> float:
    """Seconds from `500ms`, `30s`, `5m`, `1h`, `1d` or a plain non-negative number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 30s, 5m, 1h or 1d")
    raise ValueError("expected a duration like 30s, 5m or 1h")


def _normalise_method(value: object) -> object:
    if isinstance(value, str):
        upper = value.upper()
        if not _METHOD.fullmatch(upper):
            raise ValueError(f"invalid HTTP method {value!r}")
        return upper
    return value


def _check_path(value: object) -> object:
    if isinstance(value, str) and not value.startswith("/"):
        raise ValueError(f"path pattern {value!r} must start with '/'")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Method = Annotated[StrictStr, BeforeValidator(_normalise_method)]
PathPattern = Annotated[StrictStr, BeforeValidator(_check_path)]


class _Section(BaseModel):
    """Strict base: unknown keys are errors; an empty YAML value (`key:`) means 'not set'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class NetworkSection(_Section):
    ports: list[Port] = Field(default_factory=lambda: [80, 443], min_length=1)
    block_private: StrictBool = True
    max_tunnel_lifetime: Duration | None = None  # open tunnels are closed after this long


class EncodedLabelsSection(_Section):
    """Labels that look like encoded data (DNS/subdomain exfiltration); see docs/auto-review.md."""

    enabled: StrictBool = True
    max_label: Annotated[StrictInt, Field(ge=8, le=63)] = 40  # a longer label is a signal
    min_entropy: Annotated[float, Field(ge=0, le=8)] = 3.5  # bits/char, for labels >= 16 chars
    hex_min: Annotated[StrictInt, Field(ge=8, le=63)] = 24  # a hex-only label this long
    base32_min: Annotated[StrictInt, Field(ge=8, le=63)] = 32  # a base32-only label this long
    max_labels: Annotated[StrictInt, Field(ge=3, le=127)] = 8  # more labels than this


class RateSection(_Section):
    """An agent touching more than `max_new` new destinations within `window` escalates."""

    enabled: StrictBool = True
    max_new: Annotated[StrictInt, Field(ge=1, le=100_000)] = 10
    window: Duration = 300.0


class RulesReviewerSection(_Section):
    """The built-in rule reviewer (no network)."""

    kind: Literal["rules"]
    trusted: list[StrictStr] = Field(default_factory=list)  # host patterns to auto-approve
    deny_ip_literals: StrictBool = True
    deny_other_ports: StrictBool = True  # a port not in standard_ports is denied
    standard_ports: list[Port] = Field(default_factory=lambda: [80, 443])
    lookalikes: StrictBool = True
    encoded: EncodedLabelsSection = Field(default_factory=EncodedLabelsSection)
    risky_tlds: list[StrictStr] = Field(default_factory=list)
    categories: dict[StrictStr, list[StrictStr]] = Field(default_factory=dict)  # name: patterns
    rate: RateSection = Field(default_factory=RateSection)
    otherwise: Literal["escalate", "approve"] = "escalate"  # no signal either way

    @model_validator(mode="after")
    def _check_patterns(self) -> RulesReviewerSection:
        from proxy.policy.match import parse_pattern  # match imports this module

        for pattern in [*self.trusted, *(p for ps in self.categories.values() for p in ps)]:
            parse_pattern(pattern)  # a ValueError names the pattern and what is wrong
        return self


class WebhookReviewerSection(_Section):
    """POST a review request to `url`; timeout, error or a malformed answer escalates."""

    kind: Literal["webhook"]
    url: StrictStr
    timeout: Duration = 5.0
    headers: dict[StrictStr, StrictStr] = Field(default_factory=dict)


class LlmReviewerSection(_Section):
    """An OpenAI-compatible chat-completions endpoint; anything but a valid answer escalates."""

    kind: Literal["llm"]
    url: StrictStr  # the API base, e.g. http://127.0.0.1:8000/v1
    model: StrictStr
    api_key_env: StrictStr | None = None  # the variable holding the API key
    timeout: Duration = 15.0
    enabled: StrictBool = True


ReviewerSection = Annotated[
    RulesReviewerSection | WebhookReviewerSection | LlmReviewerSection,
    Field(discriminator="kind"),
]


class AutoApproveSection(_Section):
    """What an automatic approval may grant: at most `scope`, for the agent or for all (an
    anonymous caller is granted more than `once` only under `for: all`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: StrictBool = True
    scope: Scope = Scope.SESSION
    grant_for: Literal["agent", "all"] = Field(default="agent", alias="for")


NotifyOn = Literal["held", "resolved"]
NOTIFY_EVENTS: tuple[NotifyOn, ...] = ("held", "resolved")
_ENV_REF = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _webhook_url(value: object) -> object:
    """An http(s) URL, or `env:NAME` naming the variable that holds one (a Slack webhook's
    URL is its secret)."""
    if isinstance(value, str) and not _ENV_REF.fullmatch(value):
        scheme, sep, rest = value.partition("://")
        host = rest.split("/", 1)[0]
        visible = value.isprintable() and not any(c.isspace() for c in value)
        if not sep or scheme.lower() not in ("http", "https") or not host or not visible:
            raise ValueError(f"{value!r} must be an http:// or https:// URL (or env:VARIABLE)")
    return value


def _env_ref(value: object) -> object:
    if isinstance(value, str) and not _ENV_REF.fullmatch(value):
        raise ValueError(
            "a header value is read from the proxy's environment, never written in the policy: "
            "write env:VARIABLE"
        )
    return value


def _header_name(value: object) -> object:
    if isinstance(value, str) and not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


class NotifyTargetSection(_Section):
    """A webhook told when a pending item is held or resolved (docs/notifications.md)."""

    url: Annotated[StrictStr, BeforeValidator(_webhook_url), Field(max_length=2000)]
    format: Literal["json", "slack"] = "json"
    events: list[NotifyOn] = Field(default_factory=lambda: list(NOTIFY_EVENTS), min_length=1)
    headers: dict[
        Annotated[StrictStr, BeforeValidator(_header_name)],
        Annotated[StrictStr, BeforeValidator(_env_ref)],
    ] = Field(default_factory=dict)
    timeout: Duration = 5.0  # per attempt
    attempts: Annotated[StrictInt, Field(ge=1, le=20)] = 5
    backoff: Duration = 1.0  # the first retry's delay; doubled for each next one, jittered
    queue: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1000  # beyond it: dropped, counted


class ApprovalSection(_Section):
    wait: Duration = 30.0
    pending_ttl: Duration = 3600.0
    session_idle: Duration = 8 * 3600.0
    once_window: Annotated[Duration, Field(le=300.0)] = 10.0  # a once is about one operation
    max_pending: Annotated[StrictInt, Field(ge=1, le=100_000)] = 20
    max_pending_total: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 1000
    scopes: list[Scope] = Field(default_factory=lambda: list(Scope), min_length=1)
    review: list[ReviewerSection] = Field(default_factory=list)
    auto: AutoApproveSection = Field(default_factory=AutoApproveSection)
    notify: list[NotifyTargetSection] = Field(default_factory=list)
    console_url: (
        Annotated[StrictStr, BeforeValidator(_webhook_url), Field(max_length=500)] | None
    ) = None


class InspectSection(_Section):
    host: StrictStr
    methods: list[Method] | None = None
    deny_paths: list[PathPattern] = Field(default_factory=list)
    scan: ScanMode = ScanMode.ENFORCE

    @field_validator("scan", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` as false (and `on` as true).
        if isinstance(value, bool):
            return ScanMode.ENFORCE if value else ScanMode.OFF
        return value


class SecretSourceSection(_Section):
    env: StrictStr | None = None
    file: StrictStr | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretSourceSection:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file")
        return self


class BasicInjectSection(_Section):
    user: StrictStr | None = None  # replaces the user the client sent (None: keep it)


class SecretInjectSection(_Section):
    header: StrictStr | None = None
    format: StrictStr = "{value}"
    basic: BasicInjectSection | None = None

    @model_validator(mode="after")
    def _one_way(self) -> SecretInjectSection:
        if (self.header is None) == (self.basic is None):
            raise ValueError("give exactly one of header or basic")
        if self.header is not None and "{value}" not in self.format:
            raise ValueError("format must contain {value}")
        return self


class SecretSection(_Section):
    id: StrictStr = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    env_name: StrictStr | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source: SecretSourceSection
    hosts: list[StrictStr] = Field(min_length=1)
    inject: SecretInjectSection


class AgentSection(_Section):
    default: DefaultAction | None = None
    allow: list[StrictStr] = Field(default_factory=list)
    deny: list[StrictStr] = Field(default_factory=list)


class TelemetrySection(_Section):
    """OpenTelemetry export settings; each key mirrors a standard OTEL_* variable."""

    endpoint: StrictStr | None = None  # OTEL_EXPORTER_OTLP_ENDPOINT
    protocol: Literal["grpc", "http/protobuf"] | None = None  # OTEL_EXPORTER_OTLP_PROTOCOL
    headers: dict[StrictStr, StrictStr] = Field(default_factory=dict)  # ..._OTLP_HEADERS
    service_name: StrictStr | None = None  # OTEL_SERVICE_NAME
    resource_attributes: dict[StrictStr, StrictStr] = Field(default_factory=dict)

    def as_env(self) -> dict[str, str]:
        """The OTEL_* variables these settings stand for (only those set)."""
        env: dict[str, str] = {}
        if self.endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.endpoint
        if self.protocol:
            env["OTEL_EXPORTER_OTLP_PROTOCOL"] = self.protocol
        if self.headers:
            env["OTEL_EXPORTER_OTLP_HEADERS"] = ",".join(
                f"{k}={v}" for k, v in self.headers.items()
            )
        if self.service_name:
            env["OTEL_SERVICE_NAME"] = self.service_name
        if self.resource_attributes:
            env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(
                f"{k}={v}" for k, v in self.resource_attributes.items()
            )
        return env


def _single_line(value: object) -> object:
    if isinstance(value, str) and not value.isprintable():
        raise ValueError("must be one line of printable text")
    return value


def _http_url(value: object) -> object:
    if isinstance(value, str):
        scheme, sep, rest = value.partition("://")
        host = rest.split("/", 1)[0]
        visible = value.isprintable() and not any(c.isspace() for c in value)
        if not sep or scheme.lower() not in ("http", "https") or not host or not visible:
            raise ValueError(f"help_url {value!r} must be an http:// or https:// URL")
    return value


class RefusalSection(_Section):
    """Text added to every refusal an agent gets: who to ask, and where to read more."""

    contact: Annotated[StrictStr, BeforeValidator(_single_line), Field(max_length=300)] | None = (
        None
    )
    help_url: Annotated[StrictStr, BeforeValidator(_http_url), Field(max_length=500)] | None = None


class AuthSection(_Section):
    """Agent authentication: where the agents file is, and whether credentials are required."""

    agents_file: StrictStr | None = None
    required: StrictBool | None = None


class PolicyFile(_Section):
    """One policy file as written (SPEC section 3)."""

    version: Literal[1]
    # Other policy files (presets) whose rules join this one's, paths relative to this file;
    # they merge before it, so what this file sets wins.
    include: list[StrictStr] = Field(default_factory=list)
    mode: Mode = Mode.ENFORCE
    default: DefaultAction = DefaultAction.ASK
    allow: list[StrictStr] = Field(default_factory=list)
    deny: list[StrictStr] = Field(default_factory=list)
    network: NetworkSection = Field(default_factory=NetworkSection)
    approval: ApprovalSection = Field(default_factory=ApprovalSection)
    inspect: list[InspectSection] = Field(default_factory=list)
    agents: dict[StrictStr, AgentSection] = Field(default_factory=dict)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    auth: AuthSection = Field(default_factory=AuthSection)
    refusal: RefusalSection = Field(default_factory=RefusalSection)
    secrets: list[SecretSection] = Field(default_factory=list)


class RequirementsFile(PolicyFile):
    """An admin-managed requirements file: the policy schema plus the caps (SPEC section 3)."""

    managed_only: StrictBool = False
    max_default: DefaultAction | None = None

    @field_validator("include")
    @classmethod
    def _no_include(cls, value: list[str]) -> list[str]:
        if value:
            raise ValueError("not supported in a requirements file: write the floor's rules here")
        return value


@dataclass(frozen=True)
class AgentRules:
    """One file's rules for one agent, with source lines."""

    default: DefaultAction | None
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]


@dataclass(frozen=True)
class PolicyDocument:
    """One validated policy file: the schema model plus rules carrying `file:line` sources.

    What the file actually set (for merging) is `spec.model_fields_set` and the sections' own.
    """

    file: str
    spec: PolicyFile
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    inspect: tuple[InspectRule, ...]
    agents: Mapping[str, AgentRules]
    secrets: tuple[SecretRule, ...] = ()
    includes: tuple[tuple[str, int], ...] = ()  # `include:` entries as written, with their line
    # pattern as written -> parsed form, so compiling does not parse every rule twice
    patterns: Mapping[str, ParsedPattern] = field(default_factory=dict, repr=False, compare=False)
