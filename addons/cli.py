"""The `egress-warden` command: the core's CLI with the mitmproxy engine plugged in for `run`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from proxy import cli
from proxy.config import RunConfig
from proxy.policy.model import EffectivePolicy


async def _serve(cfg: RunConfig, policy: EffectivePolicy, warnings: list[str]) -> int:
    from addons.lean import lean_mitmproxy_addons

    lean_mitmproxy_addons()  # before mitmproxy's addons package is first imported
    from addons.runtime import serve  # mitmproxy is imported only by the command that runs it

    return await serve(cfg, policy, warnings)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, engine=_serve)


if __name__ == "__main__":
    sys.exit(main())
