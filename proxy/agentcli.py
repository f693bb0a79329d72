"""`egress-warden env` and `egress-warden exec`: put an agent process behind the proxy."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from proxy.agentenv import (
    DEFAULT_PROXY,
    BadProxyURL,
    Shell,
    TrustFiles,
    agent_environment,
    merge_environment,
    parse_proxy,
    render,
)
from proxy.config import parse_endpoint
from proxy.identity import valid_id
from proxy.isolate import IsolationError, check_isolation_available, run_isolated
from proxy.policy.load import PolicyErrors
from proxy.policy.requirements import load_effective
from proxy.secrets.broker import agent_variables, load_or_create_key
from proxy.trustbundle import TrustBundleError, write_trust_bundle

DEFAULT_POLICY = Path("policies/default.yaml")
TOKEN_VARIABLE = "EGRESS_WARDEN_AGENT_TOKEN"


class UsageError(Exception):
    """A bad option; the message says which."""


def _token(args: argparse.Namespace) -> str | None:
    if args.token and args.token_file:
        raise UsageError("give --token or --token-file, not both")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read {args.token_file}: {exc.strerror}") from None
        if not token:
            raise UsageError(f"{args.token_file} is empty")
        return token
    if args.token:
        return str(args.token)
    return (os.environ.get(TOKEN_VARIABLE) or None) if args.agent else None


def _interception_on(args: argparse.Namespace) -> bool:
    """Does the policy put any host under `inspect:` (then agents need the proxy CA)?"""
    if args.ca == "always":
        return True
    if args.ca == "never":
        return False
    if not args.policy and not DEFAULT_POLICY.is_file():
        print(
            f"egress-warden: note: no --policy and no {DEFAULT_POLICY} here, so no CA variables "
            "(give the proxy's --policy, or --ca always)",
            file=sys.stderr,
        )
        return False
    files = [Path(p) for p in args.policy] or [DEFAULT_POLICY]
    requirements = Path(args.requirements) if args.requirements else None
    policy, _warnings = load_effective(files, requirements)
    return bool(policy.inspect)


def build_environment(args: argparse.Namespace, proxy_url: str | None = None) -> dict[str, str]:
    """The variables for the agent; `proxy_url` overrides `--proxy` (the isolated forwarder)."""
    for label, value in (("--agent", args.agent), ("--session", args.session)):
        if value is not None and not valid_id(value):
            raise UsageError(f"{label} {value!r}: letters, digits and . _ @ - (at most 128)")
    if args.session and not args.agent:
        raise UsageError("--session needs --agent")
    token = _token(args)
    if token is not None and not args.agent:
        raise UsageError("a token needs --agent")
    trust: TrustFiles | None = None
    if _interception_on(args):
        base = Path(args.ca_bundle_base) if args.ca_bundle_base else None
        trust = write_trust_bundle(Path(args.state_dir), base)
    endpoint = parse_proxy(proxy_url or args.proxy)
    env = agent_environment(
        endpoint, args.agent, args.session, token, trust, connect_command=_connect_command()
    )
    if getattr(args, "secrets", False):
        env.update(_secret_variables(args))
    return env


def _secret_variables(args: argparse.Namespace) -> dict[str, str]:
    """`--secrets`: the agent's placeholders for the policy's brokered secrets (never a value)."""
    files = [Path(p) for p in args.policy] or [DEFAULT_POLICY]
    requirements = Path(args.requirements) if args.requirements else None
    policy, _warnings = load_effective(files, requirements)
    if not policy.secrets:
        return {}
    try:
        key = load_or_create_key(Path(args.state_dir))
    except OSError as exc:
        raise UsageError(f"placeholder key in {args.state_dir}: {exc}") from None
    return agent_variables(key, args.agent, policy.secrets)


def _fail(message: str, code: int = 2) -> int:
    print(f"egress-warden: {message}", file=sys.stderr)
    return code


def cmd_env(args: argparse.Namespace) -> int:
    try:
        env = build_environment(args)
    except PolicyErrors as errors:
        for error in errors.errors:
            print(str(error), file=sys.stderr)
        return 2
    except (UsageError, BadProxyURL, TrustBundleError) as exc:
        return _fail(str(exc))
    sys.stdout.write(render(env, Shell(args.shell)))
    return 0


def _dns_listener(text: str | None, isolate: bool) -> tuple[str, int] | None:
    """`exec --dns H:P`: the proxy's `run --dns` listener, for isolated commands to resolve
    through (a wildcard bind address means this host)."""
    if text is None:
        return None
    if not isolate:
        raise UsageError("--dns needs --isolate (without it the command uses the host's DNS)")
    try:
        endpoint = parse_endpoint(text)
    except ValueError as exc:
        raise UsageError(f"--dns {exc}") from None
    if endpoint.port == 0:
        raise UsageError(f"--dns {text!r}: give the DNS listener's port")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(endpoint.host, endpoint.host)
    return host, endpoint.port


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        return _fail("exec needs a command: egress-warden exec [options] -- CMD ARGS...")
    try:
        dns = _dns_listener(args.dns, args.isolate)
        if args.isolate:
            endpoint = parse_proxy(args.proxy)
            check_isolation_available()
            inner = f"http://127.0.0.1:{endpoint.port}"
            env = merge_environment(os.environ, build_environment(args, inner))
            return run_isolated(command, env, endpoint.host, endpoint.port, endpoint.port, dns)
        env = merge_environment(os.environ, build_environment(args))
    except PolicyErrors as errors:
        for error in errors.errors:
            print(str(error), file=sys.stderr)
        return 2
    except (UsageError, BadProxyURL, TrustBundleError) as exc:
        return _fail(str(exc))
    except IsolationError as exc:
        return _fail(f"not running the command: {exc}", 125)
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        return _fail(f"{command[0]}: command not found", 127)
    except PermissionError:
        return _fail(f"{command[0]}: permission denied", 126)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", metavar="ID", help="the agent's id (credentials in the proxy URL)")
    p.add_argument("--session", metavar="S", help="a session id (AGENT~SESSION)")
    p.add_argument(
        "--token",
        metavar="T",
        help=f"the agent's token (or ${TOKEN_VARIABLE}); others can read it in ps: prefer a file",
    )
    p.add_argument("--token-file", metavar="FILE", help="read the agent's token from FILE")
    p.add_argument("--proxy", default=DEFAULT_PROXY, metavar="URL", help=f"default {DEFAULT_PROXY}")
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="FILE",
        help="the proxy's policy: whether it inspects (then CA variables are set)",
    )
    p.add_argument("--requirements", metavar="FILE")
    p.add_argument(
        "--state-dir",
        default=".state",
        metavar="DIR",
        help="the proxy's state dir: its CA, and where ca/bundle.pem is written",
    )
    p.add_argument(
        "--ca",
        choices=["auto", "always", "never"],
        default="auto",
        help="CA variables: when the policy inspects (auto), always or never",
    )
    p.add_argument(
        "--secrets",
        action="store_true",
        help="add the agent's placeholders for the policy's brokered secrets (NAME=ewph_...)",
    )
    p.add_argument(
        "--ca-bundle-base",
        metavar="FILE",
        help="roots to trust besides the proxy CA (default: the system bundle)",
    )


def _connect_command() -> str:
    """How ssh should run `egress-warden connect` (an absolute path: ssh runs it via a shell
    whose PATH may differ)."""
    found = shutil.which("egress-warden")
    program = shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m proxy.cli"
    return f"{program} connect %h %p"


def cmd_connect(args: argparse.Namespace) -> int:
    from proxy.connectcmd import main as connect

    return connect(args.host, args.port, args.proxy)


def add_agent_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `env`, `exec` and `connect` on the top-level parser."""
    connect = sub.add_parser(
        "connect",
        help="relay stdin/stdout to HOST PORT through the proxy (an ssh ProxyCommand)",
    )
    connect.add_argument("host")
    connect.add_argument("port", type=int)
    connect.add_argument(
        "--proxy", metavar="URL", help="default: HTTPS_PROXY (with the agent's credentials)"
    )
    connect.set_defaults(func=cmd_connect)
    env = sub.add_parser("env", help="print the environment an agent process needs")
    _add_common(env)
    env.add_argument("--shell", choices=[s.value for s in Shell], default=Shell.SH.value)
    env.set_defaults(func=cmd_env)

    run = sub.add_parser(
        "exec",
        help="run a command with that environment (--isolate: the proxy is its only way out)",
    )
    _add_common(run)
    run.add_argument(
        "--isolate",
        action="store_true",
        help="own network namespace with only loopback; a forwarder there leads to the proxy",
    )
    run.add_argument(
        "--dns",
        metavar="H:P",
        help="with --isolate: resolve names through the proxy's `run --dns` listener at H:P "
        "(the policy answers; else nothing resolves inside)",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    run.set_defaults(func=cmd_exec)
