"""A default start stays light: the real proxy, started with the default policy and no OTLP
endpoint, never imports the optional heavy parts (OTLP exporters and gRPC, the OTel SDK,
asyncpg, openai, detect-secrets, the confusables tables, mitmproxy's unused default addons, the
webhook client). Read from the process itself with
Python's import profiler (PYTHONPROFILEIMPORTTIME), which names every module it imports."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.proxy import REPO, ProxyProcess, start_proxy

pytestmark = pytest.mark.e2e

# Imported only when configured: OTLP export, a PostgreSQL store, an LLM reviewer, an inspected
# host (credential scanning), a rules reviewer (look-alike names).
OPTIONAL = (
    "grpc",
    "opentelemetry.exporter",
    "opentelemetry.sdk",
    "proxy.telemetry.otel_export",
    "asyncpg",
    "psycopg",
    "openai",
    "detect_secrets",
    "confusable_homoglyphs",
    # mitmproxy's default addons the engine does not use (addons/lean.py), and the webhook
    # client (only with `approval.notify`)
    "mitmproxy.addons.onboardingapp",
    "mitmproxy.addons.proxyauth",
    "flask",
    "ldap3",
    "httpx",
)
NO_OTLP = {
    name: ""  # empty counts as unset for egress-warden and the SDK
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_LOGS_EXPORTER",
        "OTEL_METRICS_EXPORTER",
    )
}


def _imported(proc: ProxyProcess) -> set[str]:
    """Every module the process imported, from its `import time:` lines."""
    names = set()
    for line in list(proc.raw):
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name)
    return names


def _started_modules(tmp: Path, policy: Path | None = None, **env: str) -> set[str]:
    proc = start_proxy(
        tmp / "state",
        [policy or REPO / "policies" / "default.yaml"],
        env={**NO_OTLP, "PYTHONPROFILEIMPORTTIME": "1", **env},
    )
    try:
        time.sleep(0.5)  # anything imported right after the listeners open counts too
    finally:
        proc.stop()
    return _imported(proc)


def _loaded(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def test_default_start_imports_no_optional_heavy_module(tmp_path: Path) -> None:
    modules = _started_modules(tmp_path)
    # The profile is real: the engine, the control API and the store's driver are there.
    assert {"mitmproxy.proxy.server", "fastapi", "aiosqlite", "addons.warden"} <= modules
    loaded = {package: _loaded(modules, package)[:3] for package in OPTIONAL}
    assert {k: v for k, v in loaded.items() if v} == {}


def test_otlp_endpoint_loads_the_sdk_and_exporter(tmp_path: Path) -> None:
    """The other side of the bargain: configured, the exporter is there (so the check above
    would see it)."""
    modules = _started_modules(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
    )
    assert _loaded(modules, "grpc")
    assert _loaded(modules, "opentelemetry.sdk")
    assert "proxy.telemetry.otel_export" in modules


def test_a_scanning_policy_builds_the_scanner_at_start(tmp_path: Path) -> None:
    """An inspected host with scanning: detect-secrets is loaded when the policy is (off the
    event loop), not by the first inspected request."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nallow: [docs.test]\ninspect:\n  - host: docs.test\n")
    modules = _started_modules(tmp_path, policy)
    assert _loaded(modules, "detect_secrets")
