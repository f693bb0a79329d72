"""docker/: the Dockerfile, the entrypoint, compose.yaml and the Kubernetes example.

No Docker engine is needed: the files are parsed and checked, the entrypoint runs locally with a
fake binary (flag mapping) and once with the real one (readiness, SIGTERM), and the image's
HEALTHCHECK command runs against that real instance.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.proxy import REPO, free_port

DOCKER = REPO / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
STATE = "/var/lib/egress-warden"
DEFAULT_POLICY = "/etc/egress-warden/policies/default.yaml"
SECRETISH = re.compile(r"(TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|PRIVATE_?KEY)", re.IGNORECASE)


# -- Dockerfile --------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKER / "Dockerfile")


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (kw, _) in enumerate(instructions) if kw == "FROM"]
    return instructions[starts[-1] :]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_dockerfile_base_is_pinned_python_312_slim(dockerfile: list[tuple[str, str]]) -> None:
    froms = [args.split()[0] for kw, args in dockerfile if kw == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    stages = {args.split()[-1] for kw, args in dockerfile if kw == "FROM" and " AS " in args}
    for image in froms:
        if image in stages:
            continue
        assert re.fullmatch(
            r"python:3\.12(\.\d+)?-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", image
        ), image
    final = _final_stage(dockerfile)
    copies = [args for kw, args in final if kw == "COPY" and args.startswith("--from=")]
    assert copies, "the final stage should copy the built venv from the build stage"


def test_dockerfile_runs_as_numeric_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    final = _final_stage(dockerfile)
    keywords = [kw for kw, _ in final]
    users = [(i, args) for i, (kw, args) in enumerate(final) if kw == "USER"]
    assert users, "no USER in the final stage"
    index, user = users[-1]
    assert index < keywords.index("ENTRYPOINT")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000, user
    assert not gid or (gid.isdigit() and int(gid) > 0), user


def test_dockerfile_healthcheck_ports_volume_entrypoint(
    dockerfile: list[tuple[str, str]],
) -> None:
    final = _final_stage(dockerfile)
    health = [args for kw, args in final if kw == "HEALTHCHECK"]
    assert len(health) == 1
    assert "/healthz" in health[0] and "8081" in health[0]
    assert "curl" not in health[0] and "wget" not in health[0]
    exposed = {p for kw, args in final if kw == "EXPOSE" for p in args.split()}
    assert {"8080", "8081"} <= exposed
    volumes = [args for kw, args in final if kw == "VOLUME"]
    assert any(STATE in v for v in volumes), volumes
    workdir = [args for kw, args in final if kw == "WORKDIR"]
    assert workdir and workdir[-1] == STATE
    entrypoint = next(args for kw, args in final if kw == "ENTRYPOINT")
    assert _exec_form(entrypoint) == ["/usr/local/bin/docker-entrypoint.sh"]
    assert any(
        kw == "COPY" and "docker/entrypoint.sh" in args and args.endswith(" " + entrypoint[2:-2])
        for kw, args in final
    )
    assert any(
        kw == "COPY" and "policies" in args and "/etc/egress-warden/policies" in args
        for kw, args in final
    )
    env = " ".join(args for kw, args in final if kw == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env


def test_dockerfile_fetches_nothing_and_bakes_no_secret(
    dockerfile: list[tuple[str, str]],
) -> None:
    for kw, args in dockerfile:
        assert not (kw == "ADD" and re.search(r"https?://", args)), args
        if kw in ("ENV", "ARG"):
            assert not SECRETISH.search(args), f"{kw} {args}"
    text = (DOCKER / "Dockerfile").read_text()
    assert "CONTROL_TOKEN=" not in text and "control-token" not in text


def test_dockerfile_copies_only_files_that_exist(dockerfile: list[tuple[str, str]]) -> None:
    for kw, args in dockerfile:
        if kw != "COPY" or "--from=" in args:
            continue
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), source
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and "!.venv" not in ignore and "!.state" not in ignore


def _healthcheck_code(dockerfile: list[tuple[str, str]]) -> str:
    args = next(args for kw, args in dockerfile if kw == "HEALTHCHECK")
    command = _exec_form(args[args.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    return command[2]


# -- compose.yaml ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _networks(service: dict[str, Any]) -> set[str]:
    nets = service.get("networks", [])
    return set(nets) if isinstance(nets, list) else set(nets.keys())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_agent_only_reaches_the_sidecar(compose: dict[str, Any]) -> None:
    services, networks = compose["services"], compose["networks"]
    agent = services["agent"]
    assert _networks(agent) == {"agent-net"}
    assert "network_mode" not in agent and "ports" not in agent
    assert networks["agent-net"]["internal"] is True
    env = _env(agent)
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        assert env[var] == "http://egress-warden:8080", var
    assert env.get("NO_PROXY", "") == ""
    # Everything else on agent-net is the sidecar; every other service is off that network.
    on_agent_net = {n for n, s in services.items() if "agent-net" in _networks(s)}
    assert on_agent_net == {"agent", "egress-warden"}


def test_compose_sidecar_is_locked_down(compose: dict[str, Any]) -> None:
    services, networks = compose["services"], compose["networks"]
    warden = services["egress-warden"]
    assert warden["build"]["context"] == ".."
    assert (DOCKER / ".." / warden["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert warden["read_only"] is True
    assert "/tmp" in warden["tmpfs"]
    uid = str(warden["user"]).split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert warden["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in warden["security_opt"]
    test = warden["healthcheck"]["test"]
    assert "/healthz" in " ".join(test) and "8081" in " ".join(test)
    assert _networks(warden) == {"agent-net", "backend", "egress"}
    assert networks["egress"].get("internal") is not True
    env = _env(warden)
    assert env["EGRESS_WARDEN_STORE"].startswith("postgresql://")
    assert "@postgres:5432/" in env["EGRESS_WARDEN_STORE"]
    assert "${POSTGRES_PASSWORD:?" in env["EGRESS_WARDEN_STORE"]  # required, no default
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert env["EGRESS_WARDEN_CONTROL_TOKEN"].startswith("${")  # from the environment
    deps = warden["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert "otel-collector" in deps
    assert services["agent"]["depends_on"]["egress-warden"]["condition"] == "service_healthy"


def test_compose_control_api_is_off_the_agents_network(compose: dict[str, Any]) -> None:
    services, networks = compose["services"], compose["networks"]
    warden = services["egress-warden"]
    host, _, port = _env(warden)["EGRESS_WARDEN_CONTROL"].rpartition(":")
    assert port == "8081"
    # A wildcard would listen on agent-net too: the control address must be one the agent's
    # networks do not hold.
    assert host not in ("", "0.0.0.0", "::", "[::]")
    attached = warden["networks"]
    holding = [n for n, cfg in attached.items() if (cfg or {}).get("ipv4_address") == host]
    assert len(holding) == 1, "the control address must be egress-warden's own on one network"
    net = holding[0]
    subnet = networks[net]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(host) in ipaddress.ip_network(subnet)
    for name, service in services.items():
        if name != "egress-warden" and "agent" in name:
            assert net not in _networks(service), name
    assert net not in _networks(services["agent"]) and not networks[net].get("internal")
    # Published on the host's loopback, and the console there sends Host: 127.0.0.1:8081.
    assert "127.0.0.1:8081:8081" in warden["ports"]
    assert "127.0.0.1" in _env(warden)["EGRESS_WARDEN_CONTROL_HOST"].split()
    # The CLI inside the container (`compose exec ... pending`) is pointed at that address.
    assert _env(warden)["EGRESS_WARDEN_CONTROL_URL"] == f"http://{host}:{port}"


def test_compose_ships_no_password(compose: dict[str, Any]) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    assert "POSTGRES_PASSWORD:-" not in text and "egress-warden-dev" not in text
    postgres = _env(compose["services"]["postgres"])
    assert postgres["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_compose_published_ports_are_loopback_only(compose: dict[str, Any]) -> None:
    published: dict[str, str] = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the HOST_IP:HOST:CONTAINER string form"
            host_ip, _, rest = port.partition(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[rest.split(":")[-1]] = name
    assert published.get("8081") == "egress-warden"


def test_compose_backend_services(compose: dict[str, Any]) -> None:
    services, networks = compose["services"], compose["networks"]
    assert networks["backend"]["internal"] is True
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert _networks(postgres) == {"backend"}
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert _networks(collector) == {"backend"}
    mounts = [str(v).split(":") for v in collector["volumes"]]
    config = next(m for m in mounts if m[0].endswith("otel-collector.yaml"))
    assert (DOCKER / config[0]).resolve() == DOCKER / "otel-collector.yaml"
    for service in services.values():
        for net in _networks(service):
            assert net in networks


def test_otel_collector_config() -> None:
    config = yaml.safe_load((DOCKER / "otel-collector.yaml").read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    assert "batch" in config["processors"]
    assert {"debug", "file"} <= set(config["exporters"])
    pipelines = config["service"]["pipelines"]
    assert "logs" in pipelines
    for pipeline in pipelines.values():
        assert set(pipeline["receivers"]) <= set(config["receivers"])
        assert set(pipeline["processors"]) <= set(config["processors"])
        assert set(pipeline["exporters"]) <= set(config["exporters"])
        assert "batch" in pipeline["processors"]


# -- Kubernetes --------------------------------------------------------------------------------


def _k8s_docs() -> list[dict[str, Any]]:
    files = sorted((DOCKER / "k8s").rglob("*.yaml"))
    assert files
    docs: list[dict[str, Any]] = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert isinstance(doc, dict), path
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return _k8s_docs()


def _pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] == "Pod":
            yield doc["metadata"].get("labels", {}), doc["spec"]
        elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            template = doc["spec"]["template"]
            yield template["metadata"]["labels"], template["spec"]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def test_k8s_egress_warden_containers_are_hardened(k8s: list[dict[str, Any]]) -> None:
    wardens = []
    for _labels, spec in _pod_specs(k8s):
        for container in _containers(spec):
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, container["name"]
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
            if container["name"] != "egress-warden":
                continue
            wardens.append(container)
            merged = {**spec.get("securityContext", {}), **sc}
            assert merged["runAsNonRoot"] is True
            assert merged["runAsUser"] == 10001
            assert sc["readOnlyRootFilesystem"] is True
            for probe in ("readinessProbe", "livenessProbe"):
                get = container[probe]["httpGet"]
                assert get["path"] == "/healthz" and get["port"] == 8081, probe
            assert container["resources"]["requests"] and container["resources"]["limits"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            for path in ("/tmp", STATE):
                assert "emptyDir" in volumes[mounts[path]], path
    assert len(wardens) == 2  # the two-pod layout and the sidecar variant


SIDECAR_INIT = "/usr/local/bin/egress-warden-sidecar-init"
PROXY_VARIABLES = re.compile(r"(?i)^(https?|all|no|ftp)_proxy$|^EGRESS_WARDEN_AGENT_TOKEN$")


def _port(endpoint: str) -> str:
    return endpoint.rpartition(":")[2]


def _printed_rules(env: dict[str, str]) -> str:
    """The rules docker/sidecar-init.sh installs with a container's environment."""
    result = subprocess.run(
        ["sh", str(DOCKER / "sidecar-init.sh"), "--print"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return result.stdout


def _check_sidecar_wiring(init_env: dict[str, str], proxy_env: dict[str, str], uid: int) -> None:
    """The init's rules send the agent where the proxy listens, and spare the proxy's user."""
    assert init_env["EGRESS_WARDEN_UID"] == str(uid) and uid != 0
    transparent, dns = proxy_env["EGRESS_WARDEN_TRANSPARENT"], proxy_env["EGRESS_WARDEN_DNS"]
    listen = proxy_env["EGRESS_WARDEN_LISTEN"]
    for endpoint in (transparent, dns, listen):
        assert endpoint.startswith("127.0.0.1:"), endpoint  # the redirect's target is loopback
    assert init_env["EGRESS_WARDEN_TRANSPARENT_PORT"] == _port(transparent)
    assert init_env["EGRESS_WARDEN_DNS_PORT"] == _port(dns)
    assert init_env["EGRESS_WARDEN_PROXY_PORT"] == _port(listen)
    rules = _printed_rules(init_env)
    assert f"meta skuid {uid} return" in rules
    assert f"udp dport 53 redirect to :{_port(dns)}" in rules
    assert f"tcp dport 53 redirect to :{_port(dns)}" in rules
    assert f"meta l4proto tcp redirect to :{_port(transparent)}" in rules
    assert "policy drop;" in rules
    # The control port is never exempt from the redirect (an agent must not approve itself).
    assert f"tcp dport {_port(proxy_env['EGRESS_WARDEN_CONTROL'])} return" not in rules


def _entrypoint_flags(fake: Path, env: dict[str, str]) -> dict[str, list[str]]:
    argv, _ = _entry(fake, **{k: v for k, v in env.items() if not v.startswith("${")})
    return _flags(argv)


def test_dockerfile_ships_the_sidecar_init(dockerfile: list[tuple[str, str]]) -> None:
    final = _final_stage(dockerfile)
    copies = [args for kw, args in final if kw == "COPY" and "docker/sidecar-init.sh" in args]
    assert len(copies) == 1 and copies[0].split()[-1] == SIDECAR_INIT
    assert "--chmod=0755" in copies[0]
    runs = " ".join(args for kw, args in final if kw == "RUN")
    assert "install -y --no-install-recommends nftables" in runs
    assert "rm -rf /var/lib/apt/lists/*" in runs
    # nft is installed before the image drops to the proxy's user.
    keywords = [kw for kw, _ in final]
    assert keywords.index("RUN") < keywords.index("USER")


def test_k8s_sidecar_pod_redirects_the_agent_through_the_proxy(
    k8s: list[dict[str, Any]], fake_bin: Path
) -> None:
    pod = _find(k8s, "Pod", "agent-with-sidecar")
    spec = pod["spec"]
    inits = [c["name"] for c in spec["initContainers"]]
    # The rules first, then the proxy (a native sidecar, ready before the agent starts).
    assert inits == ["sidecar-init", "egress-warden"]
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    init, warden = spec["initContainers"]
    agent = spec["containers"][0]

    assert init["command"] == [SIDECAR_INIT] and "args" not in init
    assert "restartPolicy" not in init  # a plain init container: runs to completion first
    sc = init["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert init["image"] == warden["image"]

    assert warden["restartPolicy"] == "Always"
    assert warden["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    init_env = {e["name"]: e["value"] for e in init["env"]}
    proxy_env = {e["name"]: e.get("value", "${secret}") for e in warden["env"]}
    uid = warden["securityContext"]["runAsUser"]
    _check_sidecar_wiring(init_env, proxy_env, uid)
    flags = _entrypoint_flags(fake_bin, proxy_env)
    assert flags["--transparent"] == [proxy_env["EGRESS_WARDEN_TRANSPARENT"]]
    assert flags["--dns"] == [proxy_env["EGRESS_WARDEN_DNS"]]
    assert "startupProbe" in warden  # the agent waits until the proxy answers

    # The agent: no proxy settings at all, a user the rules do not spare, no capability.
    assert not [e for e in agent.get("env", []) if PROXY_VARIABLES.match(e["name"])]
    assert not agent.get("envFrom")
    assert agent["securityContext"]["runAsUser"] not in (0, uid)
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "HTTPS_PROXY" not in json.dumps(agent) and "8080" not in json.dumps(agent)
    # Its DNS: the cluster resolver in resolv.conf, which the rules redirect to the proxy's DNS;
    # ndots 1 so names are asked as they are, not first with the cluster's search suffixes.
    assert spec.get("dnsPolicy", "ClusterFirst") == "ClusterFirst"
    assert {"name": "ndots", "value": "1"} in spec["dnsConfig"]["options"]
    text = (DOCKER / "k8s/sidecar/sidecar-pod.yaml").read_text()
    assert "per pod" in text.lower() or "applies to the pod" in text


def test_compose_transparent_sidecar(compose: dict[str, Any], fake_bin: Path) -> None:
    services = compose["services"]
    group = {"sidecar-netns", "sidecar-init", "sidecar", "transparent-agent"}
    for name in group:
        assert services[name]["profiles"] == ["transparent"], name  # opt-in
        assert services[name]["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in services[name]["security_opt"], name
    holder = services["sidecar-netns"]
    assert "agent-net" not in _networks(holder) and "egress" in _networks(holder)
    for name in group - {"sidecar-netns"}:
        assert services[name]["network_mode"] == "service:sidecar-netns", name
        assert "networks" not in services[name] and "ports" not in services[name], name

    init = services["sidecar-init"]
    assert init["entrypoint"] == [SIDECAR_INIT]
    assert init["cap_add"] == ["NET_ADMIN"] and str(init["user"]).startswith("0")
    assert init["restart"] == "no"

    sidecar = services["sidecar"]
    assert sidecar["depends_on"]["sidecar-init"]["condition"] == "service_completed_successfully"
    assert "cap_add" not in sidecar and sidecar["read_only"] is True
    uid = int(str(sidecar["user"]).split(":")[0])
    proxy_env = _env(sidecar)
    _check_sidecar_wiring(_env(init), proxy_env, uid)
    assert proxy_env["EGRESS_WARDEN_CONTROL"].startswith("127.0.0.1:")
    flags = _entrypoint_flags(fake_bin, proxy_env)
    assert flags["--transparent"] == [proxy_env["EGRESS_WARDEN_TRANSPARENT"]]
    assert flags["--dns"] == [proxy_env["EGRESS_WARDEN_DNS"]]

    agent = services["transparent-agent"]
    assert not [k for k in _env(agent) if PROXY_VARIABLES.match(k)]
    assert int(str(agent["user"]).split(":")[0]) not in (0, uid)
    assert "cap_add" not in agent and "dns" not in agent
    assert agent["depends_on"]["sidecar"]["condition"] == "service_healthy"


def test_k8s_agent_networkpolicy_allows_only_the_proxy_not_dns(
    k8s: list[dict[str, Any]],
) -> None:
    agent = _find(k8s, "Deployment", "agent")
    labels = agent["spec"]["template"]["metadata"]["labels"]
    assert labels["role"] == "agent"
    spec = agent["spec"]["template"]["spec"]
    containers = spec["containers"]
    env = {e["name"]: e.get("value") for c in containers for e in c.get("env", [])}
    # The Service's address from the service links: the agent has no DNS to look a name up.
    assert env["HTTPS_PROXY"] == "http://$(EGRESS_WARDEN_SERVICE_HOST):8080"
    assert spec["enableServiceLinks"] is True
    assert all(c["name"] != "egress-warden" for c in containers)
    assert spec["dnsPolicy"] == "None"
    assert spec["dnsConfig"]["nameservers"] == ["127.0.0.1"]

    policies = [
        d
        for d in k8s
        if d["kind"] == "NetworkPolicy"
        and d["metadata"]["namespace"] == agent["metadata"]["namespace"]
        and all(
            labels.get(k) == v for k, v in d["spec"]["podSelector"].get("matchLabels", {}).items()
        )
        and not d["spec"]["podSelector"].get("matchExpressions")
    ]
    egress_policies = [p for p in policies if "Egress" in p["spec"]["policyTypes"]]
    assert egress_policies, "no NetworkPolicy restricts the agent's egress"
    rules = [rule for p in egress_policies for rule in p["spec"].get("egress", [])]
    assert rules, "the agent must be able to reach egress-warden"
    for rule in rules:
        peers, ports = rule["to"], rule["ports"]
        assert peers and ports, "a rule without `to` or `ports` allows everything"
        # Only the proxy port: in particular no UDP/TCP 53 to kube-dns (DNS is a way out).
        assert {(p.get("protocol", "TCP"), p["port"]) for p in ports} == {("TCP", 8080)}
        for peer in peers:
            assert set(peer) == {"podSelector"}
            assert peer["podSelector"] == {"matchLabels": {"app": "egress-warden"}}
    warden = _find(k8s, "Deployment", "egress-warden")
    assert warden["spec"]["template"]["metadata"]["labels"]["app"] == "egress-warden"
    service = _find(k8s, "Service", "egress-warden")
    assert service["spec"]["selector"] == {"app": "egress-warden"}
    assert 8080 in {p["port"] for p in service["spec"]["ports"]}
    text = (DOCKER / "k8s/networkpolicy.yaml").read_text().lower()
    assert "not even dns" in text and "channel out" in text


def test_k8s_egress_warden_networkpolicy(k8s: list[dict[str, Any]]) -> None:
    policy = _find(k8s, "NetworkPolicy", "egress-warden")
    ingress = policy["spec"]["ingress"]
    by_port = {rule["ports"][0]["port"]: rule for rule in ingress}
    assert set(by_port) == {8080, 8081}
    assert by_port[8080]["from"] == [{"podSelector": {"matchLabels": {"role": "agent"}}}]
    assert "egress-warden-admin" in json.dumps(by_port[8081]["from"])
    blocks = [
        peer["ipBlock"]
        for rule in policy["spec"]["egress"]
        for peer in rule["to"]
        if "ipBlock" in peer
    ]
    v4 = next(b for b in blocks if b["cidr"] == "0.0.0.0/0")
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(v4["except"])
    default_deny = _find(k8s, "NetworkPolicy", "default-deny")
    assert default_deny["spec"]["podSelector"] == {}


CREATE_SECRET = re.compile(
    r"kubectl -n agents create secret generic egress-warden((?:\\\n|[^\n])*)"
)


def test_k8s_applies_no_secret_and_documents_the_one_to_create(
    k8s: list[dict[str, Any]],
) -> None:
    assert not [d for d in k8s if d["kind"] == "Secret"], "kubectl apply would deploy a secret"
    refs: set[tuple[str, str]] = set()
    for _labels, spec in _pod_specs(k8s):
        for container in _containers(spec):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
    assert {name for name, _ in refs} == {"egress-warden"}
    keys = {key for _, key in refs}
    assert keys == {"control-token", "postgres-password", "store-url"}
    for path in (DOCKER / "k8s/egress-warden.yaml", REPO / "docs/fleet.md"):
        command = CREATE_SECRET.search(path.read_text())
        assert command, f"{path}: the Secret's one-liner is missing"
        literals = dict(re.findall(r"--from-literal=([\w-]+)=\"?([^\s\"]+)", command.group(1)))
        assert set(literals) == keys, path
        assert literals["control-token"] == "$(openssl"  # random, never a fixed value
    namespace = _find(k8s, "Namespace", "agents")
    assert namespace["metadata"]["name"] == "agents"


def test_k8s_configmap_policy_is_valid(k8s: list[dict[str, Any]], tmp_path: Path) -> None:
    config = _find(k8s, "ConfigMap", "egress-warden-policy")
    policy = tmp_path / "policy.yaml"
    policy.write_text(config["data"]["policy.yaml"])
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "policy", "validate", str(policy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout


# -- the entrypoint ----------------------------------------------------------------------------


def test_entrypoint_is_valid_posix_sh() -> None:
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert "set -eu" in ENTRYPOINT.read_text()
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True, timeout=10)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    script = tmp_path / "fake-egress-warden"
    script.write_text('#!/bin/sh\necho "pid=$$"\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    script.chmod(0o755)
    return script


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESS_WARDEN_")}
    env.update(extra)
    return env


def _entry(fake: Path, *args: str, **env: str) -> tuple[list[str], str]:
    """argv the fake binary saw, and the entrypoint's stderr; also checks that it exec'd."""
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT), *args],
        env=_clean_env(EGRESS_WARDEN_BIN=str(fake), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    first, *argv = out.splitlines()
    assert first == f"pid={proc.pid}", "the entrypoint must exec the binary"
    return argv, err


def _flags(argv: list[str]) -> dict[str, list[str]]:
    assert argv[0] == "run"
    flags: dict[str, list[str]] = {}
    for flag, value in zip(argv[1::2], argv[2::2], strict=True):
        flags.setdefault(flag, []).append(value)
    return flags


def test_entrypoint_defaults(fake_bin: Path) -> None:
    argv, err = _entry(fake_bin)
    assert _flags(argv) == {
        "--listen": ["0.0.0.0:8080"],
        "--control": ["0.0.0.0:8081"],
        "--policy": [DEFAULT_POLICY],
        "--state-dir": [STATE],
    }
    assert f"{STATE}/control-token" in err


def test_entrypoint_maps_variables(fake_bin: Path, tmp_path: Path) -> None:
    argv, err = _entry(
        fake_bin,
        EGRESS_WARDEN_POLICY="/p/a.yaml /p/b.yaml:/p/c.yaml",
        EGRESS_WARDEN_REQUIREMENTS="/etc/req.yaml",
        EGRESS_WARDEN_LISTEN="127.0.0.1:9000",
        EGRESS_WARDEN_CONTROL="127.0.0.1:9001",
        EGRESS_WARDEN_STATE_DIR=str(tmp_path),
        EGRESS_WARDEN_MODE="audit",
        EGRESS_WARDEN_CONTROL_TOKEN="s3cret-token-value",
    )
    assert _flags(argv) == {
        "--listen": ["127.0.0.1:9000"],
        "--control": ["127.0.0.1:9001"],
        "--policy": ["/p/a.yaml", "/p/b.yaml", "/p/c.yaml"],
        "--requirements": ["/etc/req.yaml"],
        "--mode": ["audit"],
        "--state-dir": [str(tmp_path)],
    }
    assert "EGRESS_WARDEN_CONTROL_TOKEN" in err
    assert "s3cret-token-value" not in err


# Every `run` option, its variable and two values (lists get two items to show the splitting).
RUN_OPTION_VARIABLES: dict[str, tuple[str, str, list[str]]] = {
    "--agents": ("EGRESS_WARDEN_AGENTS", "/etc/ew/agents.yaml", ["/etc/ew/agents.yaml"]),
    "--control-host": (
        "EGRESS_WARDEN_CONTROL_HOST",
        "127.0.0.1  warden.example",
        ["127.0.0.1", "warden.example"],
    ),
    "--socks": ("EGRESS_WARDEN_SOCKS", "0.0.0.0:1080", ["0.0.0.0:1080"]),
    "--transparent": ("EGRESS_WARDEN_TRANSPARENT", "127.0.0.1:15001", ["127.0.0.1:15001"]),
    "--dns": ("EGRESS_WARDEN_DNS", "127.0.0.1:15053", ["127.0.0.1:15053"]),
    "--source-agent": (
        "EGRESS_WARDEN_SOURCE_AGENT",
        "10.0.0.0/24=ci-bot fd00::/64=dev",
        ["10.0.0.0/24=ci-bot", "fd00::/64=dev"],
    ),
    "--resolve": (
        "EGRESS_WARDEN_RESOLVE",
        "a.test:10.0.0.5\tb.test:2001:db8::5",
        ["a.test:10.0.0.5", "b.test:2001:db8::5"],
    ),
    "--nameserver": (
        "EGRESS_WARDEN_NAMESERVER",
        "10.0.0.53 [2001:db8::53]:5353",
        ["10.0.0.53", "[2001:db8::53]:5353"],
    ),
    "--drain": ("EGRESS_WARDEN_DRAIN", "25s", ["25s"]),
    "--workers": ("EGRESS_WARDEN_WORKERS", "4", ["4"]),
    "--upstream-ca": ("EGRESS_WARDEN_UPSTREAM_CA", "/etc/ssl/corp.pem", ["/etc/ssl/corp.pem"]),
    "--audit-retention": ("EGRESS_WARDEN_AUDIT_RETENTION", "7d", ["7d"]),
    "--audit-per-agent": ("EGRESS_WARDEN_AUDIT_PER_AGENT", "5000", ["5000"]),
    "--requirements": ("EGRESS_WARDEN_REQUIREMENTS", "/etc/req.yaml", ["/etc/req.yaml"]),
    "--mode": ("EGRESS_WARDEN_MODE", "audit", ["audit"]),
    "--store": ("EGRESS_WARDEN_STORE", "postgresql://w@db/w", ["postgresql://w@db/w"]),
}
ALWAYS_GIVEN = {"--listen", "--control", "--policy", "--state-dir"}


def _run_options() -> set[str]:
    """The options `egress-warden run --help` lists (from the real parser)."""
    result = subprocess.run(
        [sys.executable, "-m", "addons.cli", "run", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(re.findall(r"^\s+(--[a-z][a-z-]*)", result.stdout, re.MULTILINE)) - {"--help"}


def test_entrypoint_has_a_variable_for_every_run_option() -> None:
    options = _run_options()
    assert "--transparent" in options and "--dns" in options
    assert options == set(RUN_OPTION_VARIABLES) | ALWAYS_GIVEN
    header = ENTRYPOINT.read_text().split("set -eu", 1)[0]
    for option, (variable, _, _) in RUN_OPTION_VARIABLES.items():
        assert f"{variable} " in header and option in header, f"{variable} is not documented"


@pytest.mark.parametrize("option", sorted(RUN_OPTION_VARIABLES))
def test_entrypoint_maps_each_run_option(fake_bin: Path, option: str) -> None:
    variable, value, expected = RUN_OPTION_VARIABLES[option]
    argv, _ = _entry(fake_bin, **{variable: value})
    flags = _flags(argv)
    assert flags[option] == expected
    assert set(flags) == ALWAYS_GIVEN | {option}
    # Unset or empty: no flag at all (the proxy's own default applies).
    argv, _ = _entry(fake_bin, **{variable: ""})
    assert option not in _flags(argv)


def test_entrypoint_list_items_are_not_globbed(fake_bin: Path, tmp_path: Path) -> None:
    (tmp_path / "a.test:1.1.1.1").write_text("")
    argv, _ = _entry(fake_bin, EGRESS_WARDEN_RESOLVE=f"{tmp_path}/*")
    assert _flags(argv)["--resolve"] == [f"{tmp_path}/*"]


def test_entrypoint_store_goes_with_the_state_dir(fake_bin: Path, tmp_path: Path) -> None:
    url = "postgresql://warden:pw@db:5432/warden"
    argv, _ = _entry(fake_bin, EGRESS_WARDEN_STORE=url, EGRESS_WARDEN_STATE_DIR=str(tmp_path))
    flags = _flags(argv)
    # the database is the store; CA, token and agents file stay in the state dir
    assert flags["--store"] == [url]
    assert flags["--state-dir"] == [str(tmp_path)]


def test_entrypoint_passes_extra_args_last(fake_bin: Path) -> None:
    extra = ["--resolve", "x.test:1.2.3.4", "--requirements", "/tmp/with space.yaml"]
    for args in (extra, ["run", *extra]):
        argv, _ = _entry(fake_bin, *args, EGRESS_WARDEN_LISTEN="0.0.0.0:1")
        assert argv[0] == "run" and argv.count("run") == 1
        assert argv[-len(extra) :] == extra
        assert _flags(argv)["--listen"] == ["0.0.0.0:1"]
    argv, _ = _entry(fake_bin, "--listen", "127.0.0.1:2")
    assert _flags(argv)["--listen"] == ["0.0.0.0:8080", "127.0.0.1:2"]  # argparse: last wins


@pytest.mark.parametrize(
    "args",
    [
        ["pending", "--control", "http://127.0.0.1:8081"],
        ["approve", "abc123", "--scope", "once"],
        ["policy", "validate", "/etc/egress-warden/policies/default.yaml"],
        ["check", "https://github.com/"],
        ["ca", "path"],
        ["--help"],
    ],
)
def test_entrypoint_other_subcommands_pass_through(fake_bin: Path, args: list[str]) -> None:
    argv, _ = _entry(fake_bin, *args, EGRESS_WARDEN_STORE="postgresql://x@y/z")
    if args[0].startswith("-"):
        assert argv[0] == "run" and argv[-1] == args[-1]
    else:
        assert argv == args


# -- the real thing ----------------------------------------------------------------------------


def _healthz(port: int) -> tuple[int, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
        return response.status, json.loads(response.read())


@pytest.mark.e2e
def test_entrypoint_runs_the_real_proxy_and_stops_on_sigterm(
    tmp_path: Path, dockerfile: list[tuple[str, str]]
) -> None:
    binary = Path(sys.executable).parent / "egress-warden"
    assert binary.exists(), f"{binary}: install the project (make install)"
    port, control = free_port(), free_port()
    state = tmp_path / "state"
    env = _clean_env(
        EGRESS_WARDEN_BIN=str(binary),
        EGRESS_WARDEN_POLICY=str(REPO / "policies/default.yaml"),
        EGRESS_WARDEN_LISTEN=f"127.0.0.1:{port}",
        EGRESS_WARDEN_CONTROL=f"127.0.0.1:{control}",
        EGRESS_WARDEN_STATE_DIR=str(state),
    )
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    # Append mode: the child shares this file's offset, and our seek(0) before each read must
    # not make its later (batched) log writes land over the lines already there.
    log = (tmp_path / "stderr.log").open("a+")
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        answer: tuple[int, Any] | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = _healthz(control)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        log.seek(0)
        assert answer == (200, {"status": "ok"}), log.read()
        assert (state / "control-token").is_file()

        # The image's HEALTHCHECK command, as Docker would run it, against this instance.
        code = _healthcheck_code(dockerfile)
        health_env = {**env, "EGRESS_WARDEN_CONTROL": f"127.0.0.1:{control}"}
        check = [sys.executable, "-c", code]
        assert subprocess.run(check, env=health_env, timeout=10).returncode == 0
        health_env["EGRESS_WARDEN_CONTROL"] = f"0.0.0.0:{control}"
        assert subprocess.run(check, env=health_env, timeout=10).returncode == 0
        health_env["EGRESS_WARDEN_CONTROL"] = f"127.0.0.1:{free_port()}"
        failed = subprocess.run(check, env=health_env, timeout=10, capture_output=True)
        assert failed.returncode != 0

        proc.send_signal(signal.SIGTERM)  # the entrypoint exec'd: this is egress-warden itself
        started = time.monotonic()
        returncode = proc.wait(timeout=10)
        log.seek(0)
        assert returncode == 0, log.read()
        assert time.monotonic() - started < 10
        log.seek(0)
        assert f"{state}/control-token" in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
