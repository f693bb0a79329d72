"""`exec --isolate`: run a command in a network namespace whose only way out is the proxy.

Layout (user, network, PID and mount namespaces, made with util-linux `unshare`):

    command -TCP-> 127.0.0.1:PORT (forwarder, inside) -Unix socket-> relay (outside) -TCP-> proxy
    command -DNS-> 127.0.0.1:53 UDP/TCP (inside) -Unix socket-> relay -TCP-> proxy's --dns listener

The new namespace has only a loopback interface: no route, so no direct connection. Names
resolve at the proxy; with `dns` (the proxy's `run --dns` listener) the command can resolve them
too, but only through the policy: a resolv.conf naming 127.0.0.1 is bind-mounted over
/etc/resolv.conf in the command's mount namespace, and a DNS forwarder there passes each query
(UDP ones framed as over TCP) through a second Unix socket to that listener, which answers allowed
names, refuses denied ones and sends no upstream query for a name the policy does not allow.
Without it there is no DNS server at all. A pathname Unix socket is a file, reachable from any
network namespace; the relay outside connects each stream to the proxy. The user namespace is
created even when running as root: without it, root inside could `setns` back into the host's
network.

Requirements: Linux with user namespaces for the calling user (`unshare --user --map-root-user`;
`kernel.unprivileged_userns_clone=1` on Debian kernels before 5.10, `user.max_user_namespaces`
> 0, and no AppArmor `kernel.apparmor_restrict_unprivileged_userns=1` without a profile). When
that fails the command is not run: `IsolationError`, exit 125.

This module imports only the standard library: its inside half runs as a script
(`python -P isolate.py --inside ...`) so it needs nothing importable from the working tree.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

EXIT_NOT_ISOLATED = 125  # as `env`/`timeout` use 125 for "the wrapper itself failed"
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
# --pid --fork --mount-proc: the command sees and can address only its own processes, so it
# cannot ptrace or signal a process of the same user outside and borrow its network; when the
# command's namespace ends, whatever it left running there ends with it.
_UNSHARE = ["--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc"]
_MS_BIND = 4096
_DNS_PORT = 53
_DNS_TIMEOUT = 5.0  # seconds a forwarded query may take (a resolver retries after its own)
_RESOLV_CONF = "/etc/resolv.conf"
_WHY = (
    "it ran isolated: its only way out is the proxy (HTTP_PROXY/HTTPS_PROXY); a connection that "
    "does not use the proxy fails with 'Network is unreachable', and names resolve only through "
    "the policy (exec --dns) or not at all"
)


_INSIDE_SCRIPT = str(Path(__file__).resolve())
_Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class IsolationError(Exception):
    """The namespace cannot be made here; the command was not started."""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for writer in (a[1], b[1]):
            writer.close()


def _pass_signals(process: asyncio.subprocess.Process) -> None:
    """Hand SIGTERM/SIGHUP on to the command. Ctrl-C at a terminal already reaches the whole
    foreground process group, the command included, so SIGINT is passed on only without one
    (passed twice, an interactive agent would take it as a second Ctrl-C)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, process.send_signal, sig)
    if os.isatty(0):
        loop.add_signal_handler(signal.SIGINT, lambda: None)
    else:
        loop.add_signal_handler(signal.SIGINT, process.send_signal, signal.SIGINT)


def check_isolation_available() -> None:
    """Raise `IsolationError` (with the reason) unless `unshare` can make the namespaces here."""
    if sys.platform != "linux":
        raise IsolationError("--isolate needs Linux network and user namespaces")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise IsolationError("--isolate needs util-linux `unshare` on PATH")
    probe = subprocess.run(
        [unshare, *_UNSHARE, "true"], capture_output=True, text=True, timeout=10, check=False
    )
    if probe.returncode != 0:
        raise IsolationError(
            "cannot create a user and network namespace "
            f"({probe.stderr.strip() or f'unshare exited {probe.returncode}'}); "
            "--isolate needs user namespaces enabled for this user (sysctl "
            "user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 where it exists, "
            "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile allowing it) "
            "or, in a container, one started with permission to create namespaces"
        )


def run_isolated(
    command: Sequence[str],
    env: Mapping[str, str],
    proxy_host: str,
    proxy_port: int,
    inner_port: int,
    dns: tuple[str, int] | None = None,
) -> int:
    """Run `command` isolated, its loopback port `inner_port` relayed to the proxy; its exit code.
    With `dns` (the proxy's DNS listener, host and port) it resolves names through it.

    Raises `IsolationError` before starting anything when the namespace cannot be made.
    """
    check_isolation_available()
    workdir = Path(tempfile.mkdtemp(prefix="egress-warden-isolate-"))
    try:
        return asyncio.run(
            _run_isolated(command, env, proxy_host, proxy_port, inner_port, workdir, dns)
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _relay_to(host: str, port: int) -> _Handler:
    """A Unix-socket handler that splices each stream to host:port (outside the namespace)."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await _splice((reader, writer), upstream)

    return relay


async def _run_isolated(
    command: Sequence[str],
    env: Mapping[str, str],
    proxy_host: str,
    proxy_port: int,
    inner_port: int,
    workdir: Path,
    dns: tuple[str, int] | None,
) -> int:
    sock_path = workdir / "proxy.sock"
    servers = [await asyncio.start_unix_server(_relay_to(proxy_host, proxy_port), str(sock_path))]
    dns_args: list[str] = []
    if dns is not None:
        dns_sock = workdir / "dns.sock"
        servers.append(await asyncio.start_unix_server(_relay_to(*dns), str(dns_sock)))
        resolv = workdir / "resolv.conf"
        # ndots:1: a dotted name is asked as it is, not first with the host's search suffixes.
        resolv.write_text(
            f"# egress-warden exec --isolate: the proxy's DNS ({dns[0]}:{dns[1]})\n"
            "nameserver 127.0.0.1\noptions ndots:1\n",
            encoding="utf-8",
        )
        dns_args = ["--dns", str(dns_sock), str(resolv)]
    argv = [
        str(shutil.which("unshare")),
        *_UNSHARE,
        "--",
        sys.executable,
        "-P",  # no script directory on sys.path: the inside half is stdlib-only
        _INSIDE_SCRIPT,
        "--inside",
        *dns_args,
        str(sock_path),
        str(inner_port),
        proxy_host,
        str(proxy_port),
        "--",
        *command,
    ]
    try:
        process = await asyncio.create_subprocess_exec(*argv, env=dict(env))
        _pass_signals(process)
        code = await process.wait()
    finally:
        for server in servers:
            server.close()
    if code < 0:
        return 128 - code
    if code not in (0, EXIT_NOT_ISOLATED):
        print(f"egress-warden: the command exited {code}; {_WHY}", file=sys.stderr)
    return code


# --- the inside half ----------------------------------------------------------------------------


def _bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | _IFF_UP))


def _verify_isolated(proxy_host: str, proxy_port: int) -> None:
    """Refuse to run anything unless this is a namespace with loopback only, where the proxy's
    own address is unreachable."""
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ["lo"]:
        raise IsolationError(f"the namespace has interfaces {names}, expected only lo")
    try:
        with socket.create_connection((proxy_host, proxy_port), timeout=2):
            pass
    except OSError:
        return
    raise IsolationError(f"the proxy {proxy_host}:{proxy_port} is reachable directly")


def _forward_to(sock_path: str) -> _Handler:
    """A TCP handler that splices each connection to the Unix socket `sock_path` (the relay)."""

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_unix_connection(sock_path)
        except OSError:
            writer.close()
            return
        await _splice((reader, writer), upstream)

    return forward


async def _ask_over_stream(sock_path: str, query: bytes) -> bytes:
    """One DNS query, framed as over TCP (RFC 1035 4.2.2), through the relay; the answer."""
    reader, writer = await asyncio.open_unix_connection(sock_path)
    try:
        writer.write(struct.pack("!H", len(query)) + query)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()


class _DnsDatagrams(asyncio.DatagramProtocol):
    """UDP 53 inside: each query goes to the proxy's DNS listener over the relay; an answer too
    large for UDP is sent anyway (the listener marks it truncated, and the resolver retries over
    TCP, which the stream forwarder carries)."""

    def __init__(self, sock_path: str) -> None:
        self._sock_path = sock_path
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, query: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            answer = await asyncio.wait_for(_ask_over_stream(self._sock_path, query), _DNS_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return  # no answer: the resolver times out, as with an unreachable server
        if self._transport is not None:
            self._transport.sendto(answer, addr)


def _use_resolv_conf(resolv: str) -> None:
    """Bind-mount `resolv` over /etc/resolv.conf (this mount namespace only; unshare made its
    propagation private). A symlinked resolv.conf is followed to the file it names."""
    target = os.path.realpath(_RESOLV_CONF)
    if not os.path.isfile(target):
        raise OSError(f"{_RESOLV_CONF} ({target}) is not a file to mount over")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(resolv.encode(), target.encode(), None, _MS_BIND, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot bind-mount over {target}: {os.strerror(errno)}")


async def _inside(
    sock_path: str, port: int, command: Sequence[str], dns_sock: str | None = None
) -> int:
    servers: list[asyncio.Server] = [
        await asyncio.start_server(_forward_to(sock_path), "127.0.0.1", port)
    ]
    datagrams: asyncio.DatagramTransport | None = None
    if dns_sock is not None:
        servers.append(await asyncio.start_server(_forward_to(dns_sock), "127.0.0.1", _DNS_PORT))
        datagrams, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _DnsDatagrams(dns_sock), local_addr=("127.0.0.1", _DNS_PORT)
        )
    try:
        process = await asyncio.create_subprocess_exec(*command)
    except FileNotFoundError:
        print(f"egress-warden: {command[0]}: command not found", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"egress-warden: {command[0]}: permission denied", file=sys.stderr)
        return 126
    _pass_signals(process)
    code = await process.wait()
    for server in servers:
        server.close()
    if datagrams is not None:
        datagrams.close()
    return 128 - code if code < 0 else code


def _inside_main(argv: Sequence[str]) -> int:
    dns_sock: str | None = None
    resolv: str | None = None
    if argv and argv[0] == "--dns":
        dns_sock, resolv, *argv = argv[1:]
    sock_path, port, proxy_host, proxy_port, sep, *command = argv
    if sep != "--" or not command:
        print("egress-warden: isolate: bad inside arguments", file=sys.stderr)
        return EXIT_NOT_ISOLATED
    try:
        _bring_up_loopback()
        _verify_isolated(proxy_host, int(proxy_port))
        if resolv is not None:
            _use_resolv_conf(resolv)
    except (IsolationError, OSError) as exc:
        print(f"egress-warden: not running the command: {exc}", file=sys.stderr)
        return EXIT_NOT_ISOLATED
    return asyncio.run(_inside(sock_path, int(port), command, dns_sock))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--inside":
        sys.exit(_inside_main(sys.argv[2:]))
    print("usage: egress-warden exec --isolate -- CMD ...", file=sys.stderr)
    sys.exit(2)
