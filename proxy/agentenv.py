"""What an agent process needs in its environment to use the proxy, and how a shell writes it.

Pure: the variables are a function of where the proxy is, who the agent is and which trust files
exist; the CLI reads the policy and writes the trust bundle (`proxy.trustbundle`).

Why so many variables: tools read different ones. curl ignores upper-case `HTTP_PROXY` (CGI
safety) and reads `ALL_PROXY`; npm/pnpm read `npm_config_*`, Yarn 2+ `YARN_*`; pip has
`PIP_PROXY`; git's `http.proxy` is set through `GIT_CONFIG_COUNT`/`_KEY_n`/`_VALUE_n` (git 2.31+)
so no file changes; gRPC C-core reads `grpc_proxy`; the JVM reads system properties, passed in
`JAVA_TOOL_OPTIONS`; Cargo `CARGO_HTTP_PROXY`; Go reads `HTTPS_PROXY` itself. Docker's client
takes proxies for builds from its config file, not the environment, so nothing is set for it.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

from proxy.identity import proxy_url

DEFAULT_PROXY = "http://127.0.0.1:8080"

# Variables that take the trust bundle (system roots + the proxy CA): these *replace* the roots.
BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "CARGO_HTTP_CAINFO",
)
# Node *adds* these to its built-in roots, so the proxy CA alone is right.
EXTRA_CA_VARIABLES = ("NODE_EXTRA_CA_CERTS",)


class Shell(Enum):
    SH = "sh"
    FISH = "fish"
    POWERSHELL = "powershell"
    DOTENV = "dotenv"
    JSON = "json"


class BadProxyURL(ValueError):
    """The --proxy value is not `http://HOST:PORT`."""


@dataclass(frozen=True)
class ProxyEndpoint:
    scheme: str
    host: str  # without brackets
    port: int

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_proxy(url: str) -> ProxyEndpoint:
    """`http://HOST:PORT` (the port defaults to 8080, as `run --listen` does)."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http":
        raise BadProxyURL(f"proxy URL {url!r}: the proxy speaks http:// (got {parts.scheme}://)")
    if parts.username or parts.password:
        raise BadProxyURL(f"proxy URL {url!r}: give credentials with --agent/--token, not in it")
    try:
        port = parts.port or 8080
    except ValueError as exc:
        raise BadProxyURL(f"proxy URL {url!r}: {exc}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise BadProxyURL(f"proxy URL {url!r}: expected http://HOST:PORT")
    return ProxyEndpoint(parts.scheme, parts.hostname, port)


@dataclass(frozen=True)
class TrustFiles:
    """The bundle (system roots + proxy CA) and the proxy CA alone."""

    bundle: Path
    proxy_ca: Path


def agent_environment(
    proxy: ProxyEndpoint,
    agent: str | None = None,
    session: str | None = None,
    token: str | None = None,
    trust: TrustFiles | None = None,
    connect_command: str = "egress-warden connect %h %p",
) -> dict[str, str]:
    """Every variable an agent process needs, in a stable order.

    `NO_PROXY` holds only the proxy's own host: nothing else is exempt from the policy, and a
    private range there would be a way around it.
    """
    url = proxy_url(proxy.url, agent, session, token)
    env: dict[str, str] = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = url
    env["NO_PROXY"] = env["no_proxy"] = proxy.host
    env["npm_config_proxy"] = env["npm_config_https_proxy"] = url
    env["npm_config_noproxy"] = proxy.host
    env["YARN_HTTP_PROXY"] = env["YARN_HTTPS_PROXY"] = url
    env["PIP_PROXY"] = url
    env["GIT_CONFIG_COUNT"] = "1"
    env["GIT_CONFIG_KEY_0"] = "http.proxy"
    env["GIT_CONFIG_VALUE_0"] = url
    env["GRPC_PROXY"] = env["grpc_proxy"] = url
    env["CARGO_HTTP_PROXY"] = url
    java_host = f"[{proxy.host}]" if ":" in proxy.host else proxy.host
    env["JAVA_TOOL_OPTIONS"] = " ".join(
        [
            f"-Dhttp.proxyHost={java_host}",
            f"-Dhttp.proxyPort={proxy.port}",
            f"-Dhttps.proxyHost={java_host}",
            f"-Dhttps.proxyPort={proxy.port}",
            f"-Dhttp.nonProxyHosts={java_host}",
        ]
    )
    # ssh (and git over SSH) ignore proxy variables: a ProxyCommand opens a CONNECT tunnel
    # through the proxy with the credentials above (`egress-warden connect`).
    env["GIT_SSH_COMMAND"] = f"ssh -o ProxyCommand={shlex.quote(connect_command)}"
    if trust is not None:
        env.update(trust_environment(trust))
    return env


def trust_environment(trust: TrustFiles) -> dict[str, str]:
    """CA variables: the bundle where a variable replaces the roots, the CA where it adds."""
    env = {name: str(trust.bundle) for name in BUNDLE_VARIABLES}
    env.update({name: str(trust.proxy_ca) for name in EXTRA_CA_VARIABLES})
    return env


# Never handed to an agent: with the control token it could approve its own requests.
WITHHELD_VARIABLES = frozenset({"EGRESS_WARDEN_CONTROL_TOKEN"})


def merge_environment(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """`base` with `extra` laid over it, for a process `exec` starts.

    A variable of `base` that differs from one of ours only in case (`NPM_CONFIG_PROXY`) is
    dropped, so no tool picks the old one; the control token is dropped; git settings already in
    `base` (`GIT_CONFIG_COUNT`) are kept and ours appended after them.
    """
    our_names = {name.lower() for name in extra}
    merged = {
        name: value
        for name, value in base.items()
        if name.lower() not in our_names and name not in WITHHELD_VARIABLES
    }
    merged.update(extra)
    if "GIT_CONFIG_COUNT" in extra and base.get("GIT_CONFIG_COUNT", "").isdigit():
        have = int(base["GIT_CONFIG_COUNT"])
        ours = int(extra["GIT_CONFIG_COUNT"])
        for i in range(have):
            for part in ("KEY", "VALUE"):
                name = f"GIT_CONFIG_{part}_{i}"
                if name in base:
                    merged[name] = base[name]
        for i in range(ours):
            for part in ("KEY", "VALUE"):
                merged[f"GIT_CONFIG_{part}_{have + i}"] = extra[f"GIT_CONFIG_{part}_{i}"]
        merged["GIT_CONFIG_COUNT"] = str(have + ours)
    return merged


def render(env: Mapping[str, str], shell: Shell) -> str:
    """The variables as `shell` sets them (sh and fish: exported; json: one object)."""
    if shell is Shell.JSON:
        return json.dumps(dict(env), indent=2) + "\n"
    lines: list[str] = []
    for name, value in env.items():
        if "\n" in value or "\r" in value or "\x00" in value:
            raise ValueError(f"{name}: a value with a line break cannot be written")
        if shell is Shell.SH:
            lines.append(f"export {name}={shlex.quote(value)}")
        elif shell is Shell.FISH:
            quoted = value.replace("\\", "\\\\").replace("'", "\\'")
            lines.append(f"set -gx {name} '{quoted}'")
        elif shell is Shell.POWERSHELL:
            lines.append(f"$env:{name} = '{value.replace(chr(39), chr(39) * 2)}'")
        else:  # dotenv, as docker --env-file reads it: the rest of the line, taken literally
            lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"
