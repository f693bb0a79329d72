"""The `egress-warden` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.admincli import add_admin_commands
from proxy.agentcli import add_agent_commands
from proxy.agentenv import Shell, render, trust_environment
from proxy.agents import AgentRegistry, AgentsFileError
from proxy.config import RunConfig, parse_endpoint, parse_source_agent
from proxy.control.client import add_client_commands
from proxy.facts import BadURL, facts_from_url
from proxy.identity import proxy_url
from proxy.policy.load import PolicyErrors, load_policies
from proxy.policy.model import EffectivePolicy, Mode, parse_duration
from proxy.policy.requirements import load_effective, load_requirements
from proxy.resolve import Resolver, parse_nameserver_option, parse_resolve_option
from proxy.suggestcli import add_suggest_command
from proxy.trustbundle import TrustBundleError, write_trust_bundle
from proxy.verdicts import Decision, Verdict

DEFAULT_POLICY = Path("policies/default.yaml")
EXIT_FOR_VERDICT = {Verdict.ALLOW: 0, Verdict.DENY: 1, Verdict.HOLD: 3}


def _load(
    paths: Sequence[str], requirements: str | None = None
) -> tuple[EffectivePolicy, list[str]]:
    files = [Path(p) for p in paths] or [DEFAULT_POLICY]
    return load_effective(files, Path(requirements) if requirements else None)


def _print_policy_errors(errors: PolicyErrors) -> None:
    for error in errors.errors:
        print(str(error), file=sys.stderr)


def cmd_policy_validate(args: argparse.Namespace) -> int:
    status = 0
    results: list[dict[str, object]] = []
    for path in args.files:
        try:
            if args.requirements:
                load_requirements(Path(path))
            else:
                load_policies([Path(path)])
        except PolicyErrors as errors:
            status = 2
            if args.json:
                results.append({"file": path, "ok": False, "errors": _error_json(errors)})
            else:
                _print_policy_errors(errors)
        else:
            results.append({"file": path, "ok": True, "errors": []})
            if not args.json:
                print(f"{path}: ok")
    if args.json:
        print(json.dumps(results, indent=2))
    return status


def _error_json(errors: PolicyErrors) -> list[dict[str, object]]:
    return [{"file": e.file, "line": e.line, "message": e.message} for e in errors.errors]


async def _dry_run(
    policy: EffectivePolicy, args: argparse.Namespace, resolver: Resolver
) -> Decision:
    """The live proxy's steps for `args.url` (name resolution included), without holding."""
    from proxy.auth import Authenticator
    from proxy.gate import Gate, Snapshot
    from proxy.netguard import NetGuard
    from proxy.service import local_addresses
    from proxy.telemetry import Telemetry

    facts = facts_from_url(args.url, args.method, args.agent)
    snapshot = Snapshot(policy, Authenticator(), NetGuard([], local_addresses()))
    gate = Gate(snapshot, resolver, Telemetry([]))
    path = urlsplit(args.url if "://" in args.url else "https://" + args.url).path or "/"
    return await gate.dry_run(facts, resolve=not args.no_resolve, inner=(args.method.upper(), path))


def cmd_check(args: argparse.Namespace) -> int:
    try:
        policy, warnings = _load(args.policy, args.requirements)
    except PolicyErrors as errors:
        _print_policy_errors(errors)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        resolver = Resolver(
            dict(parse_resolve_option(r) for r in args.resolve),
            nameservers=[parse_nameserver_option(n) for n in args.nameserver],
        )
        decision = asyncio.run(_dry_run(policy, args, resolver))
    except (BadURL, ValueError) as exc:
        print(f"egress-warden: {exc}", file=sys.stderr)
        return 2
    if args.json:
        answer = {
            "decision": decision.verdict.value,
            "reason": decision.reason.value,
            "rule": decision.rule,
            "source": decision.source,
            "detail": decision.detail,
        }
        print(json.dumps(answer, indent=2))
        return EXIT_FOR_VERDICT[decision.verdict]
    print(f"decision: {decision.verdict.value}")
    print(f"reason:   {decision.reason.value}")
    print(
        f"rule:     {decision.rule or '-'}" + (f" ({decision.source})" if decision.source else "")
    )
    if decision.detail:
        print(f"detail:   {decision.detail}")
    return EXIT_FOR_VERDICT[decision.verdict]


def cmd_run(args: argparse.Namespace) -> int:
    try:
        policy, warnings = _load(args.policy, args.requirements)
    except PolicyErrors as errors:
        _print_policy_errors(errors)
        print("egress-warden: refusing to start without a valid policy", file=sys.stderr)
        return 2
    try:
        resolve = dict(parse_resolve_option(r) for r in args.resolve)
        cfg = RunConfig(
            policy_files=tuple(Path(p) for p in (args.policy or [str(DEFAULT_POLICY)])),
            listen=parse_endpoint(args.listen),
            control=parse_endpoint(args.control),
            state_dir=Path(args.state_dir),
            mode=Mode(args.mode) if args.mode else None,
            requirements=Path(args.requirements) if args.requirements else None,
            agents_file=Path(args.agents) if args.agents else None,
            resolve=resolve,
            store=args.store,
            audit_max_age=parse_duration(args.audit_retention),
            audit_per_agent=args.audit_per_agent,
            upstream_ca=Path(args.upstream_ca) if args.upstream_ca else None,
            nameservers=tuple(parse_nameserver_option(n) for n in args.nameserver),
            drain=parse_duration(args.drain),
            socks=parse_endpoint(args.socks) if args.socks else None,
            control_hosts=tuple(args.control_host),
            transparent=parse_endpoint(args.transparent) if args.transparent else None,
            dns=parse_endpoint(args.dns) if args.dns else None,
            source_agents=tuple(parse_source_agent(s) for s in args.source_agent),
        )
    except ValueError as exc:
        print(f"egress-warden: {exc}", file=sys.stderr)
        return 2

    if args.workers > 1 and cfg.dns is not None:
        # Each worker would hand out its own synthetic addresses, which another worker's
        # transparent listener could not map back to their names.
        print("egress-warden: --dns needs a single worker (--workers 1)", file=sys.stderr)
        return 2
    if args.workers > 1:
        from proxy.workers import supervise

        run_argv = sys.argv[sys.argv.index("run") :] if "run" in sys.argv else ["run"]
        return supervise(run_argv, args.workers, cfg.listen, cfg.control, cfg.state_dir)

    from proxy.service import StartupError

    serve: Engine | None = getattr(args, "engine", None)
    if serve is None:
        print(
            "egress-warden: `run` needs the proxy engine: use the `egress-warden` command "
            "(or python -m addons.cli)",
            file=sys.stderr,
        )
        return 2
    from proxy.telemetry.hub import configure_logging, flush_logging

    configure_logging()
    try:
        return asyncio.run(serve(cfg, policy, warnings))
    except StartupError as exc:
        print(f"egress-warden: {exc}", file=sys.stderr)
        return 1
    finally:
        flush_logging()


def cmd_agents(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else Path(args.state_dir) / "agents.yaml"
    try:
        registry = AgentRegistry.load(path)
        if args.json:
            return _agents_json(registry, args, path)
        if args.agents_command == "add":
            token = registry.add(args.agent_id)
            print(f"agent {args.agent_id} added to {path}; its token (shown only once):")
            print(token)
            example = proxy_url("http://HOST:PORT", args.agent_id, "SESSION", token)
            print(
                f"point it at the proxy with HTTPS_PROXY={example} (`~SESSION` is optional), "
                f"or run it under `egress-warden exec --agent {args.agent_id} --token-file FILE`",
                file=sys.stderr,
            )
        elif args.agents_command == "revoke":
            if not registry.revoke(args.agent_id):
                print(f"egress-warden: no agent {args.agent_id!r} in {path}", file=sys.stderr)
                return 1
            print(f"agent {args.agent_id} revoked")
        else:
            entries = registry.entries()
            if not entries:
                print(f"no agents in {path}")
            for entry in entries:
                print(f"{entry.agent:32}  created {entry.created_at}")
    except AgentsFileError as exc:
        print(f"egress-warden: {exc}", file=sys.stderr)
        return 2
    return 0


def _agents_json(registry: AgentRegistry, args: argparse.Namespace, path: Path) -> int:
    """`agents ... --json`: the same answers as objects (`add` carries the token, once)."""
    if args.agents_command == "add":
        token = registry.add(args.agent_id)
        answer: object = {"agent": args.agent_id, "token": token, "file": str(path)}
    elif args.agents_command == "revoke":
        revoked = registry.revoke(args.agent_id)
        answer = {"agent": args.agent_id, "revoked": revoked, "file": str(path)}
    else:
        answer = [{"agent": e.agent, "created_at": e.created_at} for e in registry.entries()]
    print(json.dumps(answer, indent=2))
    return 1 if args.agents_command == "revoke" and not revoked else 0


def cmd_ca(args: argparse.Namespace) -> int:
    cert = (Path(args.state_dir) / "ca" / "mitmproxy-ca-cert.pem").resolve()
    if args.what == "path":
        print(json.dumps({"path": str(cert), "exists": cert.exists()}) if args.json else cert)
    else:
        # A bundle of the system roots plus the proxy CA: the CA alone would fail every
        # HTTPS host that is not inspected (those are tunnelled, not re-signed).
        base = Path(args.ca_bundle_base) if args.ca_bundle_base else None
        try:
            trust = write_trust_bundle(Path(args.state_dir), base)
        except TrustBundleError as exc:
            print(f"egress-warden: {exc}", file=sys.stderr)
            return 2
        sys.stdout.write(render(trust_environment(trust), Shell(args.shell)))
        return 0
    if not cert.exists():
        print(f"note: {cert} is created when the proxy first starts", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-warden", description="Egress-filtering forward proxy for AI coding agents."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the proxy and the control API")
    run.add_argument("--policy", action="append", default=[], metavar="FILE")
    run.add_argument("--requirements", metavar="FILE", help="admin-managed requirements file")
    run.add_argument("--agents", metavar="FILE", help="agents file (default <state>/agents.yaml)")
    run.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    run.add_argument("--control", default="127.0.0.1:8081", metavar="HOST:PORT")
    run.add_argument(
        "--control-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name the control API answers to besides its address (repeatable)",
    )
    run.add_argument(
        "--socks",
        metavar="HOST:PORT",
        help="also a SOCKS5 listener (names resolved at the proxy) under the same policy",
    )
    run.add_argument(
        "--transparent",
        metavar="HOST:PORT",
        help="also a transparent listener for kernel-redirected connections (Linux, sidecar)",
    )
    run.add_argument(
        "--dns",
        metavar="HOST:PORT",
        help="also a policy-aware DNS listener (UDP and TCP): no upstream query for unknown names",
    )
    run.add_argument(
        "--source-agent",
        action="append",
        default=[],
        metavar="CIDR=AGENT",
        help="transparent mode: connections from this source network are this agent",
    )
    run.add_argument(
        "--state-dir",
        default=".state",
        metavar="DIR",
        help="CA, control token, agents file and (without --store) the SQLite database",
    )
    run.add_argument(
        "--store", metavar="URL", help="sqlite:///path or postgresql://... (default: state dir)"
    )
    run.add_argument("--mode", choices=[m.value for m in Mode])
    run.add_argument("--resolve", action="append", default=[], metavar="HOST:IP")
    run.add_argument(
        "--nameserver",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="DNS server to ask instead of the system resolver (repeatable)",
    )
    run.add_argument(
        "--drain",
        default="10s",
        metavar="DURATION",
        help="on SIGTERM: how long open connections get to finish (default 10s)",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N proxy processes on the same port, sharing the state store",
    )
    run.add_argument(
        "--upstream-ca",
        metavar="FILE",
        help="CA bundle that verifies upstream certificates of hosts under `inspect:`",
    )
    run.add_argument(
        "--audit-retention",
        default="30d",
        metavar="DURATION",
        help="how long decision audit rows are kept (default 30d)",
    )
    run.add_argument(
        "--audit-per-agent",
        type=int,
        default=100_000,
        metavar="N",
        help="decision audit rows kept per agent; anonymous callers count as one (default 100000)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="dry run: how would URL be decided")
    check.add_argument("url")
    check.add_argument("--method", default="GET")
    check.add_argument("--agent")
    check.add_argument("--policy", action="append", default=[], metavar="FILE")
    check.add_argument("--requirements", metavar="FILE")
    check.add_argument("--json", action="store_true", help="print the decision as JSON")
    check.add_argument("--resolve", action="append", default=[], metavar="HOST:IP")
    check.add_argument("--nameserver", action="append", default=[], metavar="IP[:PORT]")
    check.add_argument(
        "--no-resolve",
        action="store_true",
        help="skip name resolution (and so the private-network check of a name's address)",
    )
    check.set_defaults(func=cmd_check)

    policy = sub.add_parser("policy", help="policy file tools")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    validate = policy_sub.add_parser("validate", help="validate policy files")
    validate.add_argument("files", nargs="+")
    validate.add_argument(
        "--requirements", action="store_true", help="validate as requirements files"
    )
    validate.add_argument("--json", action="store_true", help="print results as JSON")
    validate.set_defaults(func=cmd_policy_validate)
    add_suggest_command(policy_sub)

    ca = sub.add_parser("ca", help="the interception CA certificate")
    ca.add_argument("what", choices=["path", "env"])
    ca.add_argument("--state-dir", default=".state", metavar="DIR")
    ca.add_argument(
        "--json", action="store_true", help="`ca path` as JSON (`ca env`: --shell json)"
    )
    ca.add_argument("--shell", choices=[s.value for s in Shell], default=Shell.SH.value)
    ca.add_argument(
        "--ca-bundle-base",
        metavar="FILE",
        help="roots to trust besides the proxy CA (default: the system bundle)",
    )
    ca.set_defaults(func=cmd_ca)

    add_agent_commands(sub)

    agents = sub.add_parser("agents", help="manage agent identities and tokens")
    agents_sub = agents.add_subparsers(dest="agents_command", required=True)
    for name, helptext in (
        ("add", "create an agent (or rotate its token); prints the token once"),
        ("list", "list agents"),
        ("revoke", "remove an agent"),
    ):
        p = agents_sub.add_parser(name, help=helptext)
        if name != "list":
            p.add_argument("agent_id", metavar="ID")
        p.add_argument("--file", metavar="FILE", help="agents file (default <state>/agents.yaml)")
        p.add_argument("--state-dir", default=".state", metavar="DIR")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        p.set_defaults(func=cmd_agents)

    add_client_commands(sub)
    add_admin_commands(sub)
    return parser


Engine = Callable[[RunConfig, EffectivePolicy, list[str]], Coroutine[Any, Any, int]]


def main(argv: Sequence[str] | None = None, *, engine: Engine | None = None) -> int:
    """Run one command; `engine` runs the proxy for `run` (the core does not know mitmproxy:
    `addons.cli` plugs it in)."""
    args = build_parser().parse_args(argv)
    args.engine = engine
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
