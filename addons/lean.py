"""A lighter mitmproxy for the embedded engine: only the addons it uses are imported."""

from __future__ import annotations

import importlib.util
import sys


def lean_mitmproxy_addons() -> None:
    """`mitmproxy.addons`' `__init__` imports every default addon (Flask and Jinja for the
    onboarding app, ldap3 for proxyauth, the flow-filter grammar, ...: 11 MiB of a 102 MiB
    start), and the engine in `addons/runtime.py` uses six of them. Register the package
    without running its `__init__`, so importing one of its modules loads that module and what
    it needs, nothing else. Call it before anything imports `mitmproxy.addons`; where mitmproxy
    has imported the package already (under `mitmdump -s`) it does nothing."""
    if "mitmproxy.addons" in sys.modules:
        return
    spec = importlib.util.find_spec("mitmproxy.addons")
    if spec is None:
        return
    package = importlib.util.module_from_spec(spec)
    sys.modules["mitmproxy.addons"] = package
    setattr(sys.modules["mitmproxy"], "addons", package)  # noqa: B010  (mypy: not declared)
