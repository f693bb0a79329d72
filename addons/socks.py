"""The SOCKS5 edge: mitmproxy's SOCKS5 handshake with one change, the CONNECT request goes to
the warden (a hook) before any upstream is dialled, and a refusal is answered the SOCKS way
(reply 0x02, connection not allowed by ruleset) instead of mitmproxy's "host unreachable".

Names in the request (`socks5h`) are never resolved here: the gate resolves them once it has
decided, and the upstream connection is pinned to the address it checked. Everything after an
admitted CONNECT (SNI check, relay, byte counts, revocation) is the warden's tunnel path.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy import connection
from mitmproxy.proxy import commands, events, layer, mode_servers
from mitmproxy.proxy.commands import StartHook
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import modes

SOCKS5_REP_SUCCEEDED = 0x00
SOCKS5_REP_NOT_ALLOWED = 0x02  # RFC 1928: connection not allowed by ruleset
SOCKS5_REP_HOST_UNREACHABLE = 0x04
_METHOD_NONE = 0x00
_METHOD_USER_PASSWORD = 0x02


def _reply(code: int) -> bytes:
    # VER REP RSV ATYP(IPv4) BND.ADDR 0.0.0.0 BND.PORT 0: clients ignore the bound address.
    return bytes([modes.SOCKS5_VERSION, code, 0x00, 0x01]) + b"\x00" * 6


@dataclass
class SocksConnectData:
    """One SOCKS5 CONNECT: what the client asked for; the warden sets `allowed`."""

    client: connection.Client
    server: connection.Server
    host: str  # a name (socks5h) or an IP literal (the client resolved it)
    port: int
    allowed: bool = False


@dataclass
class EgressSocksConnectHook(StartHook):
    """A SOCKS5 client asks to connect to `data.host:data.port`: admit it or not."""

    data: SocksConnectData


class WardenSocks5Proxy(modes.Socks5Proxy):
    """mitmproxy's Socks5Proxy, asking the warden before it dials. Username/password is
    offered whenever the client offers it (the warden verifies it in `socks5_auth`), so an
    agent's identity reaches the gate; a client that offers only "no authentication" is an
    anonymous caller, refused at CONNECT when the proxy requires credentials."""

    def state_greet(self) -> layer.CommandGenerator[None]:
        if len(self.buf) < 2:
            return
        if self.buf[0] != modes.SOCKS5_VERSION:
            yield from self.socks_err(f"Invalid SOCKS version: expected 0x05, got {self.buf[0]:#x}")
            return
        n_methods = self.buf[1]
        if len(self.buf) < 2 + n_methods:
            return
        offered = self.buf[2 : 2 + n_methods]
        if _METHOD_USER_PASSWORD in offered:
            method, self.state = _METHOD_USER_PASSWORD, self.state_auth
        elif _METHOD_NONE in offered:
            method, self.state = _METHOD_NONE, self.state_connect
        else:
            yield from self.socks_err(
                "SOCKS5 client offers no usable authentication method",
                modes.SOCKS5_METHOD_NO_ACCEPTABLE_METHODS,
            )
            return
        yield commands.SendData(self.context.client, bytes([modes.SOCKS5_VERSION, method]))
        self.buf = self.buf[2 + n_methods :]
        yield from self.state()

    # The handshake's first state (the base class binds its own `state_greet` here).
    state: Callable[..., layer.CommandGenerator[None]] = state_greet

    def state_connect(self) -> layer.CommandGenerator[None]:
        if len(self.buf) < 5:
            return
        if self.buf[:3] != b"\x05\x01\x00":  # only CONNECT: no BIND, no UDP ASSOCIATE
            yield from self.socks_err(
                "unsupported SOCKS5 command (only CONNECT)", modes.SOCKS5_REP_COMMAND_NOT_SUPPORTED
            )
            return
        atyp = self.buf[3]
        if atyp == modes.SOCKS5_ATYP_IPV4_ADDRESS:
            length = 4 + 4 + 2
        elif atyp == modes.SOCKS5_ATYP_IPV6_ADDRESS:
            length = 4 + 16 + 2
        elif atyp == modes.SOCKS5_ATYP_DOMAINNAME:
            length = 4 + 1 + self.buf[4] + 2
        else:
            yield from self.socks_err(
                f"unknown SOCKS5 address type {atyp}", modes.SOCKS5_REP_ADDRESS_TYPE_NOT_SUPPORTED
            )
            return
        if len(self.buf) < length:
            return
        message, self.buf = self.buf[:length], self.buf[length:]
        if atyp == modes.SOCKS5_ATYP_IPV4_ADDRESS:
            host = socket.inet_ntop(socket.AF_INET, message[4:-2])
        elif atyp == modes.SOCKS5_ATYP_IPV6_ADDRESS:
            host = socket.inet_ntop(socket.AF_INET6, message[4:-2])
        else:
            # Undecodable bytes stay visible (and make the host invalid for the gate).
            host = message[5:-2].decode("ascii", "backslashreplace")
        (port,) = struct.unpack("!H", message[-2:])

        decision = SocksConnectData(self.context.client, self.context.server, host, port)
        yield EgressSocksConnectHook(decision)
        if not decision.allowed:
            yield commands.SendData(self.context.client, _reply(SOCKS5_REP_NOT_ALLOWED))
            yield commands.CloseConnection(self.context.client)
            self._handle_event = self.done
            return
        # The warden pins the dialled address in `server_connect`; this is what the client named.
        self.context.server.address = (host, port)
        self.child_layer = layer.NextLayer(self.context)
        err = yield from self.finish_start()
        if err:
            yield commands.SendData(self.context.client, _reply(SOCKS5_REP_HOST_UNREACHABLE))
            yield commands.CloseConnection(self.context.client)
            return
        yield commands.SendData(self.context.client, _reply(SOCKS5_REP_SUCCEEDED))
        if self.buf:
            data, self.buf = self.buf, b""
            # Bytes the client sent before our reply are the tunnel's first bytes.
            yield from self.child_layer.handle_event(events.DataReceived(self.context.client, data))


def install() -> None:
    """Make mitmproxy's `socks5` mode use the warden's SOCKS5 layer (mitmproxy picks the top
    layer per mode class and has no option for it)."""

    def make_top_layer(self: mode_servers.Socks5Instance, context: Context) -> layer.Layer:
        return WardenSocks5Proxy(context)

    mode_servers.Socks5Instance.make_top_layer = make_top_layer  # type: ignore[method-assign]
