"""Talk to a running instance's control API: `pending`, `approve`, `deny`, `grants`, `decisions`.

`ControlClient` is a small synchronous wrapper over the HTTP contract (SPEC section 5);
`add_client_commands` registers the matching `egress-warden` subcommands on an argparse parser.
Every value printed for a person passes `safe_text`: hosts, methods, paths, notes and ids come
from agents, and a terminal must not take them for commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from proxy.control.token import TOKEN_ENV
from proxy.policy.model import parse_duration
from proxy.render import safe_text

if TYPE_CHECKING:  # httpx (with rich and click) is imported by a client, not by `run`
    import httpx

URL_ENV = "EGRESS_WARDEN_CONTROL_URL"
DEFAULT_CONTROL_URL = "http://127.0.0.1:8081"
DEFAULT_STATE_DIR = ".state"
STATE_DIR_ENV = "EGRESS_WARDEN_STATE_DIR"
TOKEN_FILE_NAME = "control-token"
DEFAULT_TIMEOUT = 10.0

EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 4

SCOPES = ("once", "session", "always")
FOR_CHOICES = ("agent", "all")
ALL_AGENTS = "all agents"
ANONYMOUS = "(anonymous)"

_TOKEN_HINT = f"set {TOKEN_ENV} or pass --token-file <state-dir>/{TOKEN_FILE_NAME}"


class ControlError(Exception):
    """A failed control API call, with a user-facing message and the CLI exit code to use."""

    def __init__(self, message: str, exit_code: int = EXIT_API) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def normalize_base_url(url: str) -> str:
    """Accept `HOST:PORT` as well as a full URL; drop a trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


class ControlClient:
    """Synchronous client for the control API; every failure raises `ControlError`."""

    def __init__(self, base_url: str, token: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        import httpx

        self.base_url = normalize_base_url(base_url)
        try:
            self._http = httpx.Client(
                base_url=self.base_url,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                timeout=timeout,
                trust_env=False,  # never route the admin's own calls through a proxy
            )
        except httpx.InvalidURL as exc:
            raise ControlError(f"invalid control URL {base_url!r}: {exc}", EXIT_USAGE) from exc

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- API calls ---------------------------------------------------------------------------

    def pending(self) -> list[dict[str, Any]]:
        """Items waiting for approval."""
        return self._list(self._request("GET", "/v1/pending"))

    def approve(
        self, id: str, scope: str = "once", for_: str | None = None, note: str | None = None
    ) -> dict[str, Any]:
        """Approve pending item `id`; releases every request waiting on it."""
        return self._resolve(id, "approve", scope, for_, note)

    def deny(
        self, id: str, scope: str = "once", for_: str | None = None, note: str | None = None
    ) -> dict[str, Any]:
        """Deny pending item `id`; waiting requests are answered 403."""
        return self._resolve(id, "deny", scope, for_, note)

    def grants(self) -> list[dict[str, Any]]:
        """Runtime grants."""
        return self._list(self._request("GET", "/v1/grants"))

    def revoke(self, id: str) -> dict[str, Any]:
        """Revoke grant `id`."""
        answer = self._request(
            "DELETE",
            f"/v1/grants/{_segment(id)}",
            subject=("grant", id, "egress-warden grants list"),
        )
        return self._object(answer)

    def sessions(self) -> list[dict[str, Any]]:
        """Agent sessions seen lately or holding session grants."""
        return self._list(self._request("GET", "/v1/sessions"))

    def end_session(self, agent: str, session: str) -> dict[str, Any]:
        """End `agent`'s `session`: its session grants are revoked on every replica."""
        answer = self._request("POST", f"/v1/sessions/{_segment(agent)}/{_segment(session)}/end")
        return self._object(answer)

    def decisions(
        self,
        limit: int = 20,
        host: str | None = None,
        decision: str | None = None,
        *,
        agent: str | None = None,
        reason: str | None = None,
        since: str | None = None,
    ) -> list[dict[str, Any]]:
        """Recent decisions, newest first, optionally filtered by host, decision, agent, reason
        and time (`since`: a duration ago such as `1h`, or unix seconds)."""
        params: dict[str, str | int] = {"limit": limit}
        for name, value in (
            ("host", host),
            ("decision", decision),
            ("agent", agent),
            ("reason", reason),
            ("since", since),
        ):
            if value:
                params[name] = value
        return self._list(self._request("GET", "/v1/decisions", params=params))

    # -- plumbing ----------------------------------------------------------------------------

    def _resolve(
        self, id: str, action: str, scope: str, for_: str | None, note: str | None
    ) -> dict[str, Any]:
        body = {"scope": scope, "note": note or ""}
        if for_ is not None:
            body["for"] = for_
        answer = self._request(
            "POST",
            f"/v1/pending/{_segment(id)}/{action}",
            json_body=body,
            subject=("pending item", id, "egress-warden pending"),
        )
        return self._object(answer)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str | int] | None = None,
        json_body: dict[str, Any] | None = None,
        subject: tuple[str, str, str] | None = None,
    ) -> Any:
        """Send one request; `subject` is (kind, id, listing command) for 404/409 messages."""
        import httpx

        try:
            response = self._http.request(method, path, params=params, json=json_body)
        except httpx.TimeoutException as exc:
            raise self._unreachable("timed out") from exc
        except httpx.UnsupportedProtocol as exc:
            raise ControlError(f"invalid control URL {self.base_url!r}: {exc}", EXIT_USAGE) from exc
        except httpx.TransportError as exc:
            raise self._unreachable(_transport_reason(exc)) from exc

        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise ControlError(
                    f"unexpected non-JSON answer from {self.base_url}{path} "
                    f"(HTTP {response.status_code}) — is --control pointing at the control port?"
                ) from exc

        detail = _error_detail(response)
        status = response.status_code
        if status == 403 and _error_code(response).endswith("role_required"):
            raise ControlError(f"not allowed with this token's role: {detail}")
        if status in (401, 403):
            raise ControlError(f"the control API rejected the token ({status}): {_TOKEN_HINT}")
        if status == 404 and subject:
            kind, ident, listing = subject
            raise ControlError(f"no {kind} with id {ident} (see `{listing}`)")
        if status == 409 and subject:
            kind, ident, _ = subject
            suffix = f": {detail}" if detail else ""
            raise ControlError(f"{kind} {ident} is already resolved{suffix}")
        raise ControlError(
            f"control API error {status} on {method} {path}: {detail or response.reason_phrase}"
        )

    def _unreachable(self, reason: str) -> ControlError:
        return ControlError(
            f"cannot reach egress-warden control API at {self.base_url}: {reason} — "
            "is `egress-warden run` running? use --control URL",
            EXIT_UNREACHABLE,
        )

    def _list(self, answer: Any) -> list[dict[str, Any]]:
        if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
            raise ControlError(f"unexpected answer from {self.base_url}: expected a JSON list")
        return answer

    def _object(self, answer: Any) -> dict[str, Any]:
        if not isinstance(answer, dict):
            raise ControlError(f"unexpected answer from {self.base_url}: expected a JSON object")
        return answer


def _segment(value: str) -> str:
    """Quote an id for use as one path segment (no `/`, `..` tricks)."""
    return quote(value, safe="")


def _transport_reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused"
    if "name or service not known" in lowered or "nodename nor servname" in lowered:
        return "unknown host"
    return text


def _error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) else ""


def _error_detail(response: httpx.Response) -> str:
    """The API's `detail` (or `error`) text, else a short slice of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("error")
        if isinstance(detail, str):
            return detail
        if detail is not None:
            return json.dumps(detail)
    return json.dumps(body)[:200]


# -- token and URL resolution ------------------------------------------------------------------


def resolve_token(token_file: str | None, state_dir: str | None) -> str:
    """`--token-file`, else $EGRESS_WARDEN_CONTROL_TOKEN, else `<state-dir>/control-token`."""
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ControlError(f"cannot read token file {path}: {reason}", EXIT_USAGE) from exc
        if not token:
            raise ControlError(f"token file {path} is empty", EXIT_USAGE)
        return token
    from_env = os.environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return from_env
    path = Path(state_dir or DEFAULT_STATE_DIR) / TOKEN_FILE_NAME
    if path.is_file():
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ControlError(f"cannot read token file {path}: {reason}", EXIT_USAGE) from exc
        if token:
            return token
    raise ControlError(
        f"no control API token: set {TOKEN_ENV}, pass --token-file FILE, or pass --state-dir DIR "
        f"of the running instance (looked for {path})",
        EXIT_USAGE,
    )


def resolve_control_url(value: str | None) -> str:
    """`--control`, else $EGRESS_WARDEN_CONTROL_URL, else the default listener."""
    return value or os.environ.get(URL_ENV, "").strip() or DEFAULT_CONTROL_URL


# -- rendering ---------------------------------------------------------------------------------


def _width(cell: str) -> int:
    """Terminal columns `cell` takes: wide East Asian characters two, combining marks none."""
    if cell.isascii():
        return len(cell)
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in cell
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; no trailing whitespace. Cells are escaped
    here (`safe_text`), so widths are those of the text as it prints."""
    shown = [[safe_text(cell) for cell in row] for row in (headers, *rows)]
    widths = [max(_width(row[i]) for row in shown) for i in range(len(headers))]
    lines = []
    for row in shown:
        cells = [cell + " " * (widths[i] - _width(cell)) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _text(value: Any) -> str:
    """A value for a person: `-` when absent, control and invisible characters escaped."""
    if value is None or value == "":
        return "-"
    return safe_text(str(value))


def _destination(item: dict[str, Any]) -> str:
    host = safe_text(str(item.get("host") or "?"))
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = item.get("port")
    return f"{host}:{_text(port)}" if port is not None else host


def format_duration(seconds: float) -> str:
    """Compact human duration: 42s, 5m07s, 1h05m, 2d03h."""
    total = round(max(0.0, seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _age(since: Any, now: float) -> str:
    if not isinstance(since, int | float):
        return "-"
    return format_duration(now - since)


def _expires_in(at: Any, now: float) -> str:
    if not isinstance(at, int | float):
        return "never"
    if at <= now:
        return "expired"
    return format_duration(at - now)


def _clock(at: Any) -> str:
    if not isinstance(at, int | float):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(at))


def render_pending(items: list[dict[str, Any]], now: float | None = None) -> str:
    """Table of pending items."""
    if not items:
        return "no pending requests"
    now = time.time() if now is None else now
    rows = [
        [
            _text(item.get("id")),
            _text(item.get("agent") or ANONYMOUS),
            _text(item.get("session")),
            _destination(item),
            _text(item.get("method")),
            _text(item.get("count")),
            _text(item.get("waiting")),
            _age(item.get("first_seen"), now),
            _expires_in(item.get("expires_at"), now),
        ]
        for item in items
    ]
    headers = [
        "ID",
        "AGENT",
        "SESSION",
        "DESTINATION",
        "METHOD",
        "COUNT",
        "WAITING",
        "AGE",
        "EXPIRES IN",
    ]
    lines = _table(headers, rows).split("\n")
    # The agent's justification and the auto-review trail, under their item when present.
    shown = [lines[0]]
    for line, item in zip(lines[1:], items, strict=True):
        shown.append(line)
        if item.get("justification"):
            shown.append(f"    why: {_text(_clip(str(item['justification']), 200))}")
        review = item.get("review")
        if isinstance(review, dict):
            trail = "; ".join(
                f"{r.get('reviewer')}: {r.get('outcome')} ({r.get('rationale')})"
                for r in review.get("trail", ())
                if isinstance(r, dict)
            )
            shown.append(f"    review: {_text(_clip(trail, 200))}")
    return "\n".join(shown)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_grants(items: list[dict[str, Any]], now: float | None = None) -> str:
    """Table of runtime grants."""
    if not items:
        return "no grants"
    now = time.time() if now is None else now
    rows = [
        [
            _text(item.get("id")),
            _text(item.get("action")),
            _text(item.get("pattern")),
            _text(item.get("scope")),
            _text(item.get("agent") or ALL_AGENTS),
            _text(item.get("session")),
            _text(item.get("created_by")),
            _expires_in(item.get("expires_at"), now),
            _text(item.get("note")),
        ]
        for item in items
    ]
    headers = [
        "ID",
        "ACTION",
        "PATTERN",
        "SCOPE",
        "FOR",
        "SESSION",
        "CREATED BY",
        "EXPIRES IN",
        "NOTE",
    ]
    return _table(headers, rows)


def render_sessions(items: list[dict[str, Any]], now: float | None = None) -> str:
    """Table of agent sessions."""
    if not items:
        return "no sessions"
    now = time.time() if now is None else now
    rows = [
        [
            _text(item.get("agent")),
            _text(item.get("session")),
            _clock(item.get("first_seen")) if item.get("first_seen") else "-",
            _age(item["last_seen"], now) + " ago" if item.get("last_seen") else "-",
            str(item.get("requests") or 0),
            ", ".join(_text(g.get("pattern")) for g in item.get("grants") or []) or "-",
        ]
        for item in items
    ]
    headers = ["AGENT", "SESSION", "FIRST SEEN", "LAST SEEN", "REQUESTS", "SESSION GRANTS"]
    return _table(headers, rows)


def render_decisions(items: list[dict[str, Any]]) -> str:
    """Table of recent decisions (local wall-clock time)."""
    if not items:
        return "no decisions recorded"
    rows = [
        [
            _clock(item.get("at")),
            _text(item.get("decision")),
            _text(item.get("reason")),
            _text(item.get("agent")),
            _destination(item) + (_text(item["path"]) if item.get("path") else ""),
            _text(item.get("rule")),
            _text(item.get("source")),
        ]
        for item in items
    ]
    headers = ["TIME", "DECISION", "REASON", "AGENT", "DESTINATION", "RULE", "SOURCE"]
    return _table(headers, rows)


_SCOPE_MEANS = {
    "once": "only the request(s) waiting now; the next request is held again",
    "session": "until that session ends (approval.session_idle without use)",
    "always": "until the grant is revoked (egress-warden grants revoke ID)",
}


def _granted_to(answer: dict[str, Any], item: dict[str, Any] | None) -> str:
    """Who an approval really covers, from the `for` the API answered (never assumed)."""
    if answer.get("for") == "all":
        return ALL_AGENTS
    grant = answer.get("grant") if isinstance(answer.get("grant"), dict) else None
    source = grant or item or {}
    agent = source.get("agent")
    if not agent:
        return "the requesting agent"
    who = f"agent {_text(agent)}"
    if answer.get("scope") == "session" and source.get("session"):
        who += f", session {_text(source.get('session'))}"
    return who


def render_resolution(
    answer: dict[str, Any], fallback_id: str, item: dict[str, Any] | None = None
) -> str:
    """What an approve/deny did, in plain words: the destination, who it covers (the API's
    answer: `all agents` when it is for everyone), how long, and the grant it created."""
    resolution = _text(answer.get("resolution") or "resolved")
    item_id = _text(answer.get("id") or fallback_id)
    scope = _text(answer.get("scope"))
    who = _granted_to(answer, item)
    what = f" {_destination(item)}" if item else ""
    head = f"{resolution} {item_id}{what} (scope {scope}, for {who})"
    released = _text(answer.get("released", 0))
    lines = [head]
    if resolution == "denied":
        lines.append(f"answered {released} waiting request(s) with 403")
    else:
        lines.append(f"released {released} waiting request(s)")
    if answer.get("for") == "all":
        verb = "refused for" if resolution == "denied" else "open to"
        anonymous = item is not None and not item.get("agent")
        why = " (it was asked for by an anonymous caller, so it cannot be limited to one)"
        lines.append(
            f"this is {verb} every caller: all agents and anonymous clients alike"
            + (why if anonymous else "")
        )
    meaning = _SCOPE_MEANS.get(str(answer.get("scope")))
    if meaning:
        lines.append(f"scope {scope}: {meaning}")
    grant = answer.get("grant")
    if isinstance(grant, dict):
        grant_who = _text(grant.get("agent") or ALL_AGENTS)
        if grant.get("session"):
            grant_who += f", session {_text(grant.get('session'))}"
        lines.append(
            f"grant {_text(grant.get('id'))}: {_text(grant.get('action'))} "
            f"{_text(grant.get('pattern'))} ({_text(grant.get('scope'))}, for {grant_who})"
        )
    return "\n".join(lines)


# -- argparse wiring ---------------------------------------------------------------------------

Handler = Callable[[ControlClient, argparse.Namespace], int]


def _run(args: argparse.Namespace, handler: Handler) -> int:
    """Build a client from the common options, run `handler`, map errors to exit codes."""
    try:
        token = resolve_token(getattr(args, "token_file", None), getattr(args, "state_dir", None))
        with ControlClient(resolve_control_url(getattr(args, "control", None)), token) as client:
            return handler(client, args)
    except ControlError as exc:
        print(f"egress-warden: {safe_text(exc.message)}", file=sys.stderr)
        return exc.exit_code


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    """Print `data` as JSON with `--json`, else the human rendering."""
    print(json.dumps(data, indent=2) if args.json else text())


def _do_pending(client: ControlClient, args: argparse.Namespace) -> int:
    items = client.pending()
    _emit(args, items, lambda: render_pending(items))
    return 0


def _pending_item(client: ControlClient, item_id: str) -> dict[str, Any] | None:
    """The pending item as listed before it is resolved (what it is, who asked), if listed."""
    try:
        items = client.pending()
    except ControlError:
        return None  # the resolution still works; its answer is printed without the item
    return next((item for item in items if item.get("id") == item_id), None)


def _do_resolve(action: str) -> Handler:
    def handler(client: ControlClient, args: argparse.Namespace) -> int:
        item = None if args.json else _pending_item(client, args.id)
        call = client.approve if action == "approve" else client.deny
        answer = call(args.id, scope=args.scope, for_=args.for_, note=args.note)
        _emit(args, answer, lambda: render_resolution(answer, args.id, item))
        return 0

    return handler


def _do_grants_list(client: ControlClient, args: argparse.Namespace) -> int:
    items = client.grants()
    _emit(args, items, lambda: render_grants(items))
    return 0


def _do_grants_revoke(client: ControlClient, args: argparse.Namespace) -> int:
    answer = client.revoke(args.id)
    _emit(args, answer, lambda: f"revoked grant {_text(answer.get('id') or args.id)}")
    return 0


def _do_sessions_list(client: ControlClient, args: argparse.Namespace) -> int:
    items = client.sessions()
    _emit(args, items, lambda: render_sessions(items))
    return 0


def _do_sessions_end(client: ControlClient, args: argparse.Namespace) -> int:
    answer = client.end_session(args.agent, args.session)
    revoked = answer.get("revoked") or []
    _emit(
        args,
        answer,
        lambda: (
            f"ended session {_text(args.agent)}~{_text(args.session)}: "
            f"{len(revoked)} session grant(s) revoked"
        ),
    )
    return 0


def _do_decisions(client: ControlClient, args: argparse.Namespace) -> int:
    items = client.decisions(
        args.limit,
        host=args.host,
        decision=args.decision,
        agent=args.agent,
        reason=args.reason,
        since=args.since,
    )
    _emit(args, items, lambda: render_decisions(items))
    return 0


def _bind(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        return _run(args, handler)

    return func


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _duration(text: str) -> str:
    """A duration as the API takes it (`1h`), checked here so a typo is a usage error."""
    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _add_common(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """The connection/output options every client command takes.

    On a nested parser (`grants list`) defaults are suppressed so an option given before the
    nested command (`grants --json list`) is not reset by the nested parser's defaults.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if nested else value

    group = parser.add_argument_group("control API connection")
    group.add_argument(
        "--control",
        metavar="URL",
        default=default(None),
        help=f"control API base URL (default: ${URL_ENV} or {DEFAULT_CONTROL_URL})",
    )
    group.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(None),
        help=f"file holding the bearer token (default: ${TOKEN_ENV}, "
        f"else <state-dir>/{TOKEN_FILE_NAME})",
    )
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        default=default(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR),
        help=f"state dir of the running instance, for its token (default: ${STATE_DIR_ENV} "
        f"or {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the raw JSON answer",
    )


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `pending`, `approve`, `deny`, `grants` and `decisions` on `sub`."""
    pending = sub.add_parser("pending", help="list requests waiting for approval")
    _add_common(pending)
    pending.set_defaults(func=_bind(_do_pending))

    for action, help_text in (
        ("approve", "approve a pending request (releases everything waiting on it)"),
        ("deny", "deny a pending request (waiting requests get 403)"),
    ):
        parser = sub.add_parser(action, help=help_text)
        parser.add_argument("id", metavar="ID", help="pending item id (see `pending`)")
        parser.add_argument(
            "--scope", choices=SCOPES, default="once", help="how long it holds (default: once)"
        )
        parser.add_argument(
            "--for",
            dest="for_",
            choices=FOR_CHOICES,
            default=None,
            help="just the requesting agent, or all agents (default: the requesting agent; "
            "all agents when it had no verified agent)",
        )
        parser.add_argument("--note", metavar="T", help="free-text note recorded with it")
        _add_common(parser)
        parser.set_defaults(func=_bind(_do_resolve(action)))

    grants = sub.add_parser("grants", help="list or revoke runtime grants")
    _add_common(grants)
    grants.set_defaults(func=_bind(_do_grants_list))
    grants_sub = grants.add_subparsers(dest="grants_command", metavar="{list,revoke}")
    grants_list = grants_sub.add_parser("list", help="list runtime grants (the default)")
    _add_common(grants_list, nested=True)
    grants_list.set_defaults(func=_bind(_do_grants_list))
    grants_revoke = grants_sub.add_parser("revoke", help="revoke a runtime grant")
    grants_revoke.add_argument("id", metavar="ID", help="grant id (see `grants list`)")
    _add_common(grants_revoke, nested=True)
    grants_revoke.set_defaults(func=_bind(_do_grants_revoke))

    sessions = sub.add_parser("sessions", help="list agent sessions, or end one")
    _add_common(sessions)
    sessions.set_defaults(func=_bind(_do_sessions_list))
    sessions_sub = sessions.add_subparsers(dest="sessions_command", metavar="{list,end}")
    sessions_list = sessions_sub.add_parser("list", help="list agent sessions (the default)")
    _add_common(sessions_list, nested=True)
    sessions_list.set_defaults(func=_bind(_do_sessions_list))
    sessions_end = sessions_sub.add_parser(
        "end", help="end a session: its session grants are revoked everywhere"
    )
    sessions_end.add_argument("agent", metavar="AGENT")
    sessions_end.add_argument("session", metavar="SESSION")
    _add_common(sessions_end, nested=True)
    sessions_end.set_defaults(func=_bind(_do_sessions_end))

    decisions = sub.add_parser("decisions", help="recent decisions, newest first")
    decisions.add_argument(
        "--limit", type=_positive_int, default=20, metavar="N", help="how many (default: 20)"
    )
    decisions.add_argument("--host", help="only decisions for this host")
    decisions.add_argument("--decision", metavar="D", help="only this decision (allow|deny|hold)")
    decisions.add_argument("--agent", metavar="ID", help="only this agent's decisions")
    decisions.add_argument(
        "--reason", metavar="R", help="only this reason (deny_rule, port, approval_pending, ...)"
    )
    decisions.add_argument(
        "--since",
        type=_duration,
        metavar="D",
        help="only decisions of the last D (30s, 5m, 1h, 1d)",
    )
    _add_common(decisions)
    decisions.set_defaults(func=_bind(_do_decisions))
