"""The agent environment: every tool's variable, NO_PROXY only the proxy, trust that adds, and
shells that read back exactly what was meant."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from proxy.agentenv import (
    BadProxyURL,
    Shell,
    TrustFiles,
    agent_environment,
    merge_environment,
    parse_proxy,
    render,
)
from proxy.trustbundle import TrustBundleError, write_trust_bundle

PROXY = parse_proxy("http://127.0.0.1:8080")
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_every_proxy_variable_carries_the_credentials() -> None:
    env = agent_environment(PROXY, "ci-bot", "run-42", "t0k")
    url = "http://ci-bot~run-42:t0k@127.0.0.1:8080"
    for name in (
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "npm_config_proxy",
        "npm_config_https_proxy",
        "YARN_HTTP_PROXY",
        "YARN_HTTPS_PROXY",
        "PIP_PROXY",
        "GRPC_PROXY",
        "grpc_proxy",
        "CARGO_HTTP_PROXY",
        "GIT_CONFIG_VALUE_0",
    ):
        assert env[name] == url, name
    assert (env["GIT_CONFIG_COUNT"], env["GIT_CONFIG_KEY_0"]) == ("1", "http.proxy")
    assert env["JAVA_TOOL_OPTIONS"].split() == [
        "-Dhttp.proxyHost=127.0.0.1",
        "-Dhttp.proxyPort=8080",
        "-Dhttps.proxyHost=127.0.0.1",
        "-Dhttps.proxyPort=8080",
        "-Dhttp.nonProxyHosts=127.0.0.1",
    ]


def test_no_proxy_holds_only_the_proxy_host() -> None:
    env = agent_environment(parse_proxy("http://proxy.internal.example:3128"))
    assert env["NO_PROXY"] == env["no_proxy"] == "proxy.internal.example"
    assert env["npm_config_noproxy"] == "proxy.internal.example"
    for value in env.values():
        for blanket in ("10.", "192.168", "172.16", "localhost", "*", ".local"):
            assert blanket not in value


def test_without_an_agent_there_are_no_credentials() -> None:
    env = agent_environment(PROXY)
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:8080"
    assert "@" not in json.dumps(env)


def test_ca_variables_only_with_trust_files_and_node_gets_the_ca_alone(tmp_path: Path) -> None:
    assert "SSL_CERT_FILE" not in agent_environment(PROXY)
    trust = TrustFiles(tmp_path / "bundle.pem", tmp_path / "ca.pem")
    env = agent_environment(PROXY, trust=trust)
    for name in (
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "PIP_CERT",
        "CARGO_HTTP_CAINFO",
    ):
        assert env[name] == str(trust.bundle)
    assert env["NODE_EXTRA_CA_CERTS"] == str(trust.proxy_ca)


def test_ipv6_proxy_hosts_are_bracketed_in_urls() -> None:
    env = agent_environment(parse_proxy("http://[::1]:8080"))
    assert env["HTTPS_PROXY"] == "http://[::1]:8080"
    assert env["NO_PROXY"] == "::1"
    assert "-Dhttp.proxyHost=[::1]" in env["JAVA_TOOL_OPTIONS"]


@pytest.mark.parametrize(
    "url",
    ["https://127.0.0.1:8080", "http://a:b@127.0.0.1:8080", "http://127.0.0.1:99999", "http:///"],
)
def test_bad_proxy_urls_are_refused(url: str) -> None:
    with pytest.raises(BadProxyURL):
        parse_proxy(url)


def test_proxy_port_defaults_to_8080() -> None:
    assert parse_proxy("127.0.0.1").url == "http://127.0.0.1:8080"


def test_existing_git_config_variables_are_kept_and_ours_appended() -> None:
    base = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "user.name", "GIT_CONFIG_VALUE_0": "x"}
    merged = merge_environment(base, agent_environment(PROXY))
    assert merged["GIT_CONFIG_COUNT"] == "2"
    assert (merged["GIT_CONFIG_KEY_0"], merged["GIT_CONFIG_VALUE_0"]) == ("user.name", "x")
    assert merged["GIT_CONFIG_KEY_1"] == "http.proxy"
    assert merged["GIT_CONFIG_VALUE_1"] == "http://127.0.0.1:8080"


def test_exec_drops_case_variants_of_our_variables_and_the_control_token() -> None:
    base = {
        "NPM_CONFIG_PROXY": "http://old.example:1",
        "Https_Proxy": "http://old.example:1",
        "EGRESS_WARDEN_CONTROL_TOKEN": "admin-secret",
        "PATH": "/usr/bin",
    }
    merged = merge_environment(base, agent_environment(PROXY))
    assert "NPM_CONFIG_PROXY" not in merged and "Https_Proxy" not in merged
    assert "EGRESS_WARDEN_CONTROL_TOKEN" not in merged
    assert merged["PATH"] == "/usr/bin"
    assert merged["npm_config_proxy"] == "http://127.0.0.1:8080"


TRICKY = {"A": 'it\'s $HOME `x` \\ "q"', "B": "-Da=1 -Db=2"}


def test_sh_output_reads_back_exactly() -> None:
    script = render(TRICKY, Shell.SH) + 'printf "%s\\n%s\\n" "$A" "$B"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [TRICKY["A"], TRICKY["B"]]


def test_other_shells_quote_as_they_read() -> None:
    fish = render(TRICKY, Shell.FISH).splitlines()
    assert fish[0] == "set -gx A 'it\\'s $HOME `x` \\\\ \"q\"'"
    ps = render(TRICKY, Shell.POWERSHELL).splitlines()
    assert ps[0] == "$env:A = 'it''s $HOME `x` \\ \"q\"'"
    assert render(TRICKY, Shell.DOTENV).splitlines()[1] == "B=-Da=1 -Db=2"
    assert json.loads(render(TRICKY, Shell.JSON)) == TRICKY


def test_a_line_break_in_a_value_is_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        render({"A": "x\ny"}, Shell.DOTENV)


def test_the_bundle_is_the_roots_then_the_proxy_ca(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    proxy_ca = tmp_path / "ca" / "mitmproxy-ca-cert.pem"
    proxy_ca.write_text(PEM.replace("MIIB", "PROXY"))
    roots = tmp_path / "roots.pem"
    roots.write_text(PEM.replace("MIIB", "ROOT"))
    trust = write_trust_bundle(tmp_path, roots)
    text = trust.bundle.read_text()
    assert text.index("ROOT") < text.index("PROXY")
    assert trust.bundle == tmp_path.resolve() / "ca" / "bundle.pem"
    assert trust.bundle.stat().st_mode & 0o777 == 0o644
    # Written again (a second `env`), it does not grow.
    assert write_trust_bundle(tmp_path, roots).bundle.read_text() == text


def test_no_bundle_before_the_proxy_made_its_ca(tmp_path: Path) -> None:
    with pytest.raises(TrustBundleError, match="first starts"):
        write_trust_bundle(tmp_path)


def test_a_base_without_certificates_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "mitmproxy-ca-cert.pem").write_text(PEM)
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(TrustBundleError, match="no PEM certificate"):
        write_trust_bundle(tmp_path, empty)
