"""`egress-warden policy suggest`: read the decision audit (from a running instance's control API
or straight from the store) and print the policy `proxy.suggest` makes of it."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from proxy.control.client import ControlClient, ControlError, resolve_control_url, resolve_token
from proxy.policy.model import parse_duration
from proxy.records import DecisionRecord
from proxy.suggest import records_from_json, render_policy, suggest

API_LIMIT = 1000  # the most rows `GET /v1/decisions` answers with
STORE_LIMIT = 10_000_000


def _from_api(args: argparse.Namespace) -> list[DecisionRecord]:
    token = resolve_token(args.token_file, args.state_dir)
    with ControlClient(resolve_control_url(args.control), token) as client:
        items = client.decisions(API_LIMIT, agent=args.agent, since=args.since)
    if len(items) >= API_LIMIT:
        print(
            f"egress-warden: the control API returned its maximum of {API_LIMIT} decisions; "
            "older ones are not in this suggestion (read the store with --store or --state-dir)",
            file=sys.stderr,
        )
    return records_from_json(items)


async def _from_store(url: str, agent: str | None, since: float | None) -> list[DecisionRecord]:
    from proxy.store import open_store

    store = await open_store(url)
    try:
        return list(await store.list_decisions(limit=STORE_LIMIT, agent=agent, since=since))
    finally:
        await store.close()


def cmd_policy_suggest(args: argparse.Namespace) -> int:
    try:
        since_seconds = parse_duration(args.since) if args.since else None
    except ValueError as exc:
        print(f"egress-warden: --since: {exc}", file=sys.stderr)
        return 2
    if args.control:
        source = f"the control API at {args.control}"
        try:
            rows = _from_api(args)
        except ControlError as exc:
            print(f"egress-warden: {exc}", file=sys.stderr)
            return exc.exit_code
    else:
        if args.store:
            url, source = args.store, "the store"
        else:
            db = Path(args.state_dir) / "warden.db"
            if not db.is_file():
                print(
                    f"egress-warden: no decision audit at {db}: pass --state-dir DIR of an "
                    "instance, --store URL, or --control URL of a running one",
                    file=sys.stderr,
                )
                return 2
            url, source = f"sqlite:///{db.resolve()}", str(db)
        cutoff = time.time() - since_seconds if since_seconds is not None else None
        from proxy.store import StoreError

        try:
            rows = asyncio.run(_from_store(url, args.agent, cutoff))
        except StoreError as exc:
            print(f"egress-warden: {exc}", file=sys.stderr)
            return 1
    sys.stdout.write(
        render_policy(suggest(rows), since=args.since, agent=args.agent, source=source)
    )
    return 0


def add_suggest_command(policy_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `policy suggest` on the `policy` command's subparsers."""
    parser = policy_sub.add_parser(
        "suggest", help="a starting policy from the decision audit, for a human to review"
    )
    parser.add_argument("--since", metavar="D", help="only decisions of the last D (24h, 7d)")
    parser.add_argument("--agent", metavar="ID", help="only this agent's decisions")
    parser.add_argument(
        "--control", metavar="URL", help="read from a running instance's control API"
    )
    parser.add_argument("--token-file", metavar="FILE", help="control API token (with --control)")
    parser.add_argument(
        "--store", metavar="URL", help="read the store directly (sqlite or postgresql)"
    )
    parser.add_argument(
        "--state-dir",
        default=".state",
        metavar="DIR",
        help="state dir whose warden.db to read, and its control token (default .state)",
    )
    parser.set_defaults(func=cmd_policy_suggest)
