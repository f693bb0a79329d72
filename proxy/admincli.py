"""`egress-warden admins`: named control API users (viewer, approver, admin) and their tokens."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from proxy.admins import AdminRegistry, AdminsFileError, admins_path
from proxy.control.access import Role


def cmd_admins(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else admins_path(Path(args.state_dir))
    try:
        registry = AdminRegistry.load(path)
        if args.admins_command == "add":
            role = Role(args.role)
            token = registry.add(args.name, role)
            if args.json:
                print(json.dumps({"name": args.name, "role": role.value, "token": token}))
                return 0
            print(f"{args.name} ({role.value}) added to {path}; the token (shown only once):")
            print(token)
            print(
                "the running proxy picks it up at once; send it as "
                "`Authorization: Bearer TOKEN` or enter it in the console",
                file=sys.stderr,
            )
        elif args.admins_command == "revoke":
            revoked = registry.revoke(args.name)
            if args.json:
                print(json.dumps({"name": args.name, "revoked": revoked}))
            elif revoked:
                print(f"{args.name} revoked")
            else:
                print(f"egress-warden: no admin {args.name!r} in {path}", file=sys.stderr)
            return 0 if revoked else 1
        else:
            entries = registry.entries()
            if args.json:
                listing = [
                    {"name": e.name, "role": e.role.value, "created_at": e.created_at}
                    for e in entries
                ]
                print(json.dumps(listing, indent=2))
                return 0
            if not entries:
                print(f"no admins in {path} (the bootstrap control token acts as `admin`)")
            for entry in entries:
                print(f"{entry.name:32}  {entry.role.value:9} created {entry.created_at}")
    except AdminsFileError as exc:
        print(f"egress-warden: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"egress-warden: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def add_admin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `admins add|list|revoke` on the top-level parser."""
    admins = sub.add_parser("admins", help="named control API users and their personal tokens")
    admins_sub = admins.add_subparsers(dest="admins_command", required=True)
    for name, helptext in (
        ("add", "create an admin (or rotate their token, set their role); prints the token once"),
        ("list", "list admins"),
        ("revoke", "remove an admin"),
    ):
        p = admins_sub.add_parser(name, help=helptext)
        if name != "list":
            p.add_argument("name", metavar="NAME")
        if name == "add":
            p.add_argument(
                "--role",
                choices=[r.value for r in Role],
                default=Role.APPROVER.value,
                help="viewer reads; approver also decides and grants; admin also opens "
                "guarded (private) addresses (default approver)",
            )
        p.add_argument("--file", metavar="FILE", help="admins file (default <state>/admins.yaml)")
        p.add_argument("--state-dir", default=".state", metavar="DIR")
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
        p.set_defaults(func=cmd_admins)
