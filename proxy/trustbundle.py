"""The trust bundle an agent uses when interception is on: the system roots plus the proxy CA.

Pointing `SSL_CERT_FILE` and friends at the proxy CA alone would break every HTTPS host that is
not inspected (those are tunnelled, so the agent sees the real server's certificate).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from proxy.agentenv import TrustFiles

PROXY_CA_NAME = "mitmproxy-ca-cert.pem"  # written by the proxy into <state>/ca at first start
BUNDLE_NAME = "bundle.pem"
_DEBIAN_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class TrustBundleError(Exception):
    """The bundle cannot be made (no proxy CA yet, no system roots); the message says why."""


def proxy_ca_path(state_dir: Path) -> Path:
    return (Path(state_dir) / "ca" / PROXY_CA_NAME).resolve()


def system_roots() -> Path | None:
    """The system's CA bundle (OpenSSL's compiled-in default), else certifi's, else None.

    `SSL_CERT_FILE` is not consulted: in an agent's shell it may already point at our bundle.
    """
    for candidate in (Path(ssl.get_default_verify_paths().openssl_cafile), _DEBIAN_BUNDLE):
        if candidate.is_file():
            return candidate
    try:
        import certifi
    except ImportError:
        return None
    return Path(certifi.where())


def write_trust_bundle(state_dir: Path, base: Path | None = None) -> TrustFiles:
    """Write `<state>/ca/bundle.pem` = `base` (default: `system_roots()`) + the proxy CA."""
    ca = proxy_ca_path(state_dir)
    if not ca.is_file():
        raise TrustBundleError(
            f"{ca} does not exist yet: the proxy creates its CA when it first starts "
            f"(egress-warden run --state-dir {state_dir})"
        )
    roots = base if base is not None else system_roots()
    if roots is None:
        raise TrustBundleError("no system CA bundle found: give one with --ca-bundle-base FILE")
    try:
        roots_pem = roots.read_text(encoding="ascii", errors="replace")
        ca_pem = ca.read_text(encoding="ascii")
    except OSError as exc:
        raise TrustBundleError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if "-----BEGIN CERTIFICATE-----" not in roots_pem:
        raise TrustBundleError(f"{roots} holds no PEM certificate")
    text = roots_pem.rstrip("\n") + "\n\n# egress-warden interception CA\n" + ca_pem
    bundle = ca.parent / BUNDLE_NAME
    # Written whole and renamed: a tool reading it meanwhile sees the old or the new bundle.
    fd, tmp = tempfile.mkstemp(dir=ca.parent, prefix=".bundle-", suffix=".pem")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # certificates only: readable by the agent's user
        os.replace(tmp, bundle)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return TrustFiles(bundle, ca)
