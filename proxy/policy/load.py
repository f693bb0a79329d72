"""Policy files → validated documents → one effective policy, with `FILE:LINE` errors.

YAML is composed into nodes (not loaded) so every value keeps its line; pydantic validates the
plain data and each error's `loc` is mapped back to the line of the node it names.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from proxy.policy.match import ParsedPattern, RuleSet, parse_pattern
from proxy.policy.model import (
    Action,
    AgentPolicy,
    AgentRules,
    ApprovalSettings,
    DefaultAction,
    EffectivePolicy,
    InspectRule,
    Mode,
    PolicyDocument,
    PolicyFile,
    RefusalSection,
    RefusalSettings,
    Rule,
    SecretRule,
)

Loc = tuple[str | int, ...]

# libyaml is ~10x faster on large rule lists; the pure-Python loader gives the same nodes.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"
_MAX_DEPTH = 64
# Alias expansion ("billion laughs") guard: nodes built a second time through an alias. A
# 373-byte, 9-level bomb expands to ~10^9 nodes (16 s and 890 MB before this bound); sharing a
# list between a few agents costs hundreds. Files without aliases never count against it.
_MAX_ALIAS_EXPANSION = 10_000


@dataclass(frozen=True)
class PolicyError:
    """One problem in a policy file, at a 1-based line (0: the file itself)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class PolicyErrors(Exception):
    """Every problem found in one or more policy files."""

    def __init__(self, errors: Iterable[PolicyError]) -> None:
        self.errors: list[PolicyError] = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


class _Tree:
    """Plain data built from YAML nodes, remembering the line of every value and key."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Loc, int] = {}  # where an error about this value should point
        self.key_lines: dict[Loc, int] = {}  # the line of the mapping key naming this value
        self.errors: list[PolicyError] = []
        self._seen: set[int] = set()  # id() of every node built (the tree keeps them alive)
        self._repeats = 0
        self._alias_line = 0  # where the expansion now under way was asked for
        self._anchor_line = 0  # and where its anchor is
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, line: int, message: str) -> None:
        self.errors.append(PolicyError(self.file, line, message))

    def build(self, node: yaml.Node, loc: Loc, depth: int = 0, use_line: int = 0) -> object:
        """Plain data for `node`; `use_line` is the line that refers to it (its key's line, or
        its sequence's), reported when an alias there expands too far."""
        if depth > _MAX_DEPTH:
            raise _TooLarge(node.start_mark.line + 1, "document nests too deeply")
        if id(node) in self._seen:
            # An alias: yaml.compose hands back the anchored node itself, once per use.
            if not self._alias_line:
                self._alias_line = use_line or node.start_mark.line + 1
                self._anchor_line = node.start_mark.line + 1
                try:
                    return self._build_repeat(node, loc, depth)
                finally:
                    self._alias_line = 0
            return self._build_repeat(node, loc, depth)
        self._seen.add(id(node))
        return self._build(node, loc, depth)

    def _build_repeat(self, node: yaml.Node, loc: Loc, depth: int) -> object:
        self._repeats += 1
        if self._repeats > _MAX_ALIAS_EXPANSION:
            raise _TooLarge(
                self._alias_line,
                f"aliases expand to more than {_MAX_ALIAS_EXPANSION:,} repeated values "
                f"(an alias bomb?); this one refers to the anchor at line {self._anchor_line}: "
                "write the values out or use fewer aliases",
            )
        return self._build(node, loc, depth)

    def _build(self, node: yaml.Node, loc: Loc, depth: int) -> object:
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc, depth)
        if isinstance(node, yaml.SequenceNode):
            items: list[object] = []
            for index, item in enumerate(node.value):
                item_loc = (*loc, index)
                self.lines[item_loc] = item.start_mark.line + 1
                items.append(self.build(item, item_loc, depth + 1, node.start_mark.line + 1))
            return items
        if node.tag == _STR_TAG:
            return node.value
        try:
            return self._constructor.construct_object(node)
        except yaml.YAMLError as exc:
            self.error(node.start_mark.line + 1, f"{_format_loc(loc)}: {exc}")
            return None

    def _mapping(self, node: yaml.MappingNode, loc: Loc, depth: int) -> dict[str, object]:
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(key_line, f"{_format_loc(loc) or 'top level'}: keys must be plain text")
                continue
            key = key_node.value
            child = (*loc, key)
            if key in result:
                first = self.key_lines[child]
                self.error(
                    key_line, f"duplicate key {_format_loc(child)!r} (first at line {first})"
                )
                continue
            self.key_lines[child] = key_line
            # Scalars point at their value; collections at the key that introduces them.
            scalar = isinstance(value_node, yaml.ScalarNode)
            self.lines[child] = value_node.start_mark.line + 1 if scalar else key_line
            result[key] = self.build(value_node, child, depth + 1, key_line)
        return result

    def line_of(self, loc: Loc) -> int:
        """The line of `loc`, or of its nearest ancestor present in the file."""
        while loc:
            line = self.lines.get(loc)
            if line is not None:
                return line
            loc = loc[:-1]
        return self.lines.get((), 1)


class _TooLarge(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


def _format_loc(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _fields_at(loc: Loc) -> list[str] | None:
    """The keys the schema allows at `loc`, for 'unknown key' hints."""
    tp: Any = PolicyFile
    for part in loc:
        tp = _unwrap_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is list and args:
            tp = args[0]
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            return None
    tp = _unwrap_optional(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _describe(error: ErrorDetails) -> str:
    loc: Loc = tuple(error["loc"])
    path = _format_loc(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        where = f" under '{_format_loc(loc[:-1])}'" if len(loc) > 1 else ""
        allowed = _fields_at(loc[:-1])
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {loc[-1]!r}{where}{hint}"
    if kind == "missing":
        hint = " (add 'version: 1' at the top)" if loc == ("version",) else ""
        return f"missing required key '{path}'{hint}"
    if loc == ("version",):
        return f"version: must be 1, got {error['input']!r}"
    if kind == "value_error":
        return f"{path}: {error.get('ctx', {}).get('error', error['msg'])}"
    return f"{path}: {error['msg']}"


def _check_patterns(
    tree: _Tree, data: dict[str, object], patterns: dict[str, ParsedPattern]
) -> None:
    """Parse every pattern the file holds; record errors on each item's own line."""

    def check(value: object, loc: Loc) -> None:
        if not isinstance(value, list):
            return  # pydantic reports the wrong type
        for index, item in enumerate(value):
            if isinstance(item, str):
                check_one(item, (*loc, index))

    def check_one(text: str, loc: Loc) -> None:
        if text in patterns:
            return
        try:
            patterns[text] = parse_pattern(text)
        except ValueError as exc:
            tree.error(tree.line_of(loc), f"{_format_loc(loc)}: {exc}")

    check(data.get("allow"), ("allow",))
    check(data.get("deny"), ("deny",))
    agents = data.get("agents")
    if isinstance(agents, dict):
        for agent, section in agents.items():
            if isinstance(section, dict):
                check(section.get("allow"), ("agents", agent, "allow"))
                check(section.get("deny"), ("agents", agent, "deny"))
    inspect = data.get("inspect")
    if isinstance(inspect, list):
        for index, section in enumerate(inspect):
            if isinstance(section, dict) and isinstance(section.get("host"), str):
                check_one(section["host"], ("inspect", index, "host"))
    secrets = data.get("secrets")
    if isinstance(secrets, list):
        for index, section in enumerate(secrets):
            if isinstance(section, dict):
                check(section.get("hosts"), ("secrets", index, "hosts"))


def _read(path: Path, file: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyErrors(
            [PolicyError(file, 0, f"cannot read policy file: {exc.strerror}")]
        ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PolicyErrors([PolicyError(file, line, "file is not valid UTF-8")]) from None


def load_policy_file(path: str | Path, schema: type[PolicyFile] = PolicyFile) -> PolicyDocument:
    """Read and validate one policy file; raise PolicyErrors listing every problem found."""
    file = str(path)
    text = _read(Path(path), file)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        detail = " ".join(part for part in (exc.context, exc.problem) if part)
        raise PolicyErrors([PolicyError(file, line, f"YAML syntax error: {detail}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyErrors([PolicyError(file, 1, f"YAML error: {exc}")]) from None
    if root is None:
        message = "empty policy file: expected a mapping starting with 'version: 1'"
        raise PolicyErrors([PolicyError(file, 1, message)])
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        message = f"the top level must be a mapping (keys like 'version:', 'allow:'), not {kind}"
        raise PolicyErrors([PolicyError(file, root.start_mark.line + 1, message)])

    tree = _Tree(file)
    tree.lines[()] = root.start_mark.line + 1
    try:
        data = tree.build(root, ())
    except _TooLarge as exc:
        raise PolicyErrors([PolicyError(file, exc.line, exc.message)]) from None
    assert isinstance(data, dict)  # the root is a mapping node

    spec: PolicyFile | None = None
    try:
        spec = schema.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc: Loc = tuple(error["loc"])
            key_line = tree.key_lines.get(loc) if error["type"] == "extra_forbidden" else None
            tree.error(key_line or tree.line_of(loc), _describe(error))
    patterns: dict[str, ParsedPattern] = {}
    _check_patterns(tree, data, patterns)
    if tree.errors or spec is None:
        raise PolicyErrors(sorted(tree.errors, key=lambda e: e.line))
    return _document(file, spec, tree, patterns)


def _document(
    file: str, spec: PolicyFile, tree: _Tree, patterns: dict[str, ParsedPattern]
) -> PolicyDocument:
    def rules(items: list[str], loc: Loc, action: Action) -> tuple[Rule, ...]:
        return tuple(
            Rule(text, action, f"{file}:{tree.line_of((*loc, i))}", patterns[text].port)
            for i, text in enumerate(items)
        )

    inspect = tuple(
        InspectRule(
            host=patterns[section.host].text,
            methods=None if section.methods is None else frozenset(section.methods),
            deny_paths=tuple(section.deny_paths),
            source=f"{file}:{tree.line_of(('inspect', i))}",
            scan=section.scan,
        )
        for i, section in enumerate(spec.inspect)
    )
    secrets = tuple(
        SecretRule(
            id=section.id,
            hosts=tuple(patterns[host].text for host in section.hosts),
            source=f"{file}:{tree.line_of(('secrets', i))}",
            env=section.source.env,
            file=(
                None
                if section.source.file is None
                else str(Path(file).parent / Path(section.source.file).expanduser())
            ),
            header=section.inject.header,
            format=section.inject.format,
            basic_user=(
                None
                if section.inject.basic is None
                else (section.inject.basic.user or "")  # "": keep the user the client sent
            ),
            env_name=section.env_name,
        )
        for i, section in enumerate(spec.secrets)
    )
    agents = {
        agent: AgentRules(
            default=section.default,
            allow=rules(section.allow, ("agents", agent, "allow"), Action.ALLOW),
            deny=rules(section.deny, ("agents", agent, "deny"), Action.DENY),
        )
        for agent, section in spec.agents.items()
    }
    return PolicyDocument(
        file=file,
        spec=spec,
        allow=rules(spec.allow, ("allow",), Action.ALLOW),
        deny=rules(spec.deny, ("deny",), Action.DENY),
        inspect=inspect,
        agents=agents,
        secrets=secrets,
        includes=tuple((text, tree.line_of(("include", i))) for i, text in enumerate(spec.include)),
        patterns=patterns,
    )


def _compile(pick: Iterable[tuple[PolicyDocument, Rule]]) -> RuleSet:
    return RuleSet.from_parsed(
        (rule, doc.patterns.get(rule.pattern) or parse_pattern(rule.pattern)) for doc, rule in pick
    )


def merge_refusal(current: RefusalSettings, section: RefusalSection) -> RefusalSettings:
    """`refusal:` keys a later file sets win, one key at a time."""
    given = section.model_fields_set
    return RefusalSettings(
        contact=section.contact if "contact" in given else current.contact,
        help_url=section.help_url if "help_url" in given else current.help_url,
    )


def merge(docs: Sequence[PolicyDocument]) -> EffectivePolicy:
    """Merge documents in order: rule lists union; a later file's scalar wins only if it sets it."""
    mode, default = Mode.ENFORCE, DefaultAction.ASK
    ports: frozenset[int] = frozenset({80, 443})
    block_private = True
    max_tunnel_lifetime: float | None = None
    approval = ApprovalSettings()
    agent_defaults: dict[str, DefaultAction | None] = {}
    telemetry: dict[str, str] = {}
    agents_file: str | None = None
    auth_required: bool | None = None
    refusal = RefusalSettings()
    secrets = _merge_secrets(docs)
    for doc in docs:
        spec = doc.spec
        given = spec.model_fields_set
        refusal = merge_refusal(refusal, spec.refusal)
        telemetry.update(spec.telemetry.as_env())
        if spec.auth.agents_file is not None:
            agents_file = str(Path(doc.file).parent / Path(spec.auth.agents_file).expanduser())
        if spec.auth.required is not None:
            auth_required = spec.auth.required
        if "mode" in given:
            mode = spec.mode
        if "default" in given:
            default = spec.default
        if "network" in given:
            if "ports" in spec.network.model_fields_set:
                ports = frozenset(spec.network.ports)
            if "block_private" in spec.network.model_fields_set:
                block_private = spec.network.block_private
            if "max_tunnel_lifetime" in spec.network.model_fields_set:
                max_tunnel_lifetime = spec.network.max_tunnel_lifetime
        if "approval" in given:
            section = spec.approval
            section_given = section.model_fields_set
            approval = ApprovalSettings(
                wait=section.wait if "wait" in section_given else approval.wait,
                pending_ttl=(
                    section.pending_ttl if "pending_ttl" in section_given else approval.pending_ttl
                ),
                scopes=frozenset(section.scopes) if "scopes" in section_given else approval.scopes,
                session_idle=(
                    section.session_idle
                    if "session_idle" in section_given
                    else approval.session_idle
                ),
                once_window=(
                    section.once_window if "once_window" in section_given else approval.once_window
                ),
                max_pending=(
                    section.max_pending if "max_pending" in section_given else approval.max_pending
                ),
                max_pending_total=(
                    section.max_pending_total
                    if "max_pending_total" in section_given
                    else approval.max_pending_total
                ),
                review=tuple(section.review) if "review" in section_given else approval.review,
                auto=section.auto if "auto" in section_given else approval.auto,
                notify=tuple(section.notify) if "notify" in section_given else approval.notify,
                console_url=(
                    section.console_url if "console_url" in section_given else approval.console_url
                ),
            )
        for agent, rules in doc.agents.items():
            if rules.default is not None or agent not in agent_defaults:
                agent_defaults[agent] = rules.default
    agents = {
        agent: AgentPolicy(
            default=agent_default,
            allow=_compile(
                ((d, r) for d in docs if agent in d.agents for r in d.agents[agent].allow),
            ),
            deny=_compile(
                ((d, r) for d in docs if agent in d.agents for r in d.agents[agent].deny),
            ),
        )
        for agent, agent_default in agent_defaults.items()
    }
    return EffectivePolicy(
        mode=mode,
        default=default,
        allow=_compile((d, r) for d in docs for r in d.allow),
        deny=_compile((d, r) for d in docs for r in d.deny),
        ports=ports,
        block_private=block_private,
        max_tunnel_lifetime=max_tunnel_lifetime,
        approval=approval,
        inspect=_with_secret_hosts(tuple(rule for d in docs for rule in d.inspect), secrets),
        agents=agents,
        files=tuple(d.file for d in docs),
        telemetry=telemetry,
        agents_file=agents_file,
        auth_required=auth_required,
        refusal=refusal,
        secrets=secrets,
    )


def _merge_secrets(docs: Sequence[PolicyDocument]) -> tuple[SecretRule, ...]:
    """`secrets:` entries of every file; a later file's entry with the same id replaces one."""
    by_id: dict[str, SecretRule] = {}
    for doc in docs:
        for secret in doc.secrets:
            by_id.pop(secret.id, None)
            by_id[secret.id] = secret
    return tuple(by_id.values())


def _with_secret_hosts(
    inspect: tuple[InspectRule, ...], secrets: tuple[SecretRule, ...]
) -> tuple[InspectRule, ...]:
    """A secret's owner hosts are intercepted (the proxy injects there): each host not already
    under `inspect` joins it, with every method allowed and scanning on."""
    written = {rule.host for rule in inspect}
    added: list[InspectRule] = []
    for secret in secrets:
        for host in secret.hosts:
            if host not in written:
                written.add(host)
                added.append(InspectRule(host, None, (), secret.source))
    return (*inspect, *added)


MAX_INCLUDE_DEPTH = 8  # a preset may include another; deeper chains are a mistake


def load_with_includes(
    path: str | Path,
    *,
    _chain: tuple[Path, ...] = (),
    _loaded: set[Path] | None = None,
) -> list[PolicyDocument]:
    """A policy file and, before it, every file it includes (depth first, each file once;
    paths relative to the including file). An unreadable, cyclic or too deep include is an
    error at the `include:` line that names it; errors inside an included file name that file.
    """
    loaded = set() if _loaded is None else _loaded
    doc = load_policy_file(path)
    here = Path(path).resolve()
    chain = (*_chain, here)
    loaded.add(here)
    docs: list[PolicyDocument] = []
    errors: list[PolicyError] = []
    for text, line in doc.includes:
        target = (Path(path).parent / Path(text).expanduser()).resolve()
        if target in chain:
            cycle = " -> ".join(p.name for p in (*chain[chain.index(target) :], target))
            errors.append(PolicyError(doc.file, line, f"include {text!r} is a cycle: {cycle}"))
        elif len(chain) > MAX_INCLUDE_DEPTH:
            message = f"include {text!r}: includes nest deeper than {MAX_INCLUDE_DEPTH} files"
            errors.append(PolicyError(doc.file, line, message))
        elif target in loaded:
            continue  # already included through another file: its rules are in once
        elif not target.is_file():
            errors.append(PolicyError(doc.file, line, f"include {text!r}: no such file {target}"))
        else:
            try:
                docs.extend(load_with_includes(target, _chain=chain, _loaded=loaded))
            except PolicyErrors as exc:
                errors.extend(exc.errors)
    if errors:
        raise PolicyErrors(errors)
    return [*docs, doc]


def load_policies(paths: Sequence[str | Path]) -> EffectivePolicy:
    """Load, validate, merge and compile policy files (and what they include); raise
    PolicyErrors for all of them."""
    if not paths:
        raise PolicyErrors([PolicyError("<policy>", 0, "no policy file given")])
    docs: list[PolicyDocument] = []
    errors: list[PolicyError] = []
    for path in paths:
        try:
            docs.extend(load_with_includes(path))
        except PolicyErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise PolicyErrors(errors)
    return merge(docs)
