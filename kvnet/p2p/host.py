"""libp2p host construction: one persisted Ed25519 identity, Noise + yamux over TCP, no dial delay.

The node's key file (from `kvnet keygen`) is the libp2p identity, so a publisher's peer ID embeds
the same Ed25519 public key that signs its manifests. Every connection limit is a named constant
here, settable per host in one `ConnectionLimits` (docs/security.md, "Connections and streams").
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import multiaddr
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as CgPrivateKey
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.transport.exceptions import SecurityUpgradeFailure

from kvnet.errors import InputError, ListenError
from kvnet.p2p.compat import (
    MAX_INBOUND_STREAMS_PER_CONNECTION,
    YAMUX_RECEIVE_WINDOW,
    GrantingYamux,
    close_listeners,
    disable_auto_connect,
    set_idle_timeout,
    set_inbound_gate,
    set_max_inbound_streams,
    set_over_limit_hook,
)
from kvnet.p2p.dht_limits import DHT_STREAMS_PER_IP

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"

# Streams start at the yamux spec's 256 KiB window in both directions; each kvnet node then grants
# YAMUX_RECEIVE_WINDOW (4 MiB) to its peer with a WINDOW_UPDATE (kvnet.p2p.compat.GrantingYamux), so
# bulk transfer between kvnet nodes runs at 4 MiB windows while a stock go/js/rust/py peer is never
# sent more than it granted.
YAMUX_INITIAL_WINDOW = YAMUX_RECEIVE_WINDOW

# Connection limits (docs/security.md, "Connections and streams"). py-libp2p enforces the connection
# limits given to it by connection_config(); kvnet names its own values instead of inheriting upstream's
# defaults silently. The stream cap is kvnet's (kvnet.p2p.compat section 4).
MAX_CONNECTIONS = 300
"""Connections in total, inbound and outbound (py-libp2p refuses the next one at registration)."""
OUTBOUND_RESERVE = 50
"""Of MAX_CONNECTIONS, kept for this node's own dials: py-libp2p caps inbound connections at
MAX_CONNECTIONS - OUTBOUND_RESERVE (its `min_connections`), so strangers dialling in can never take
the slots a node needs to fetch and to answer DHT lookups."""
MAX_INBOUND_CONNECTIONS = MAX_CONNECTIONS - OUTBOUND_RESERVE
"""Inbound connections open at once (250). A slot is freed when its connection closes
(kvnet.p2p.compat.handle_inbound_until_closed; upstream freed it only at host shutdown)."""
MAX_CONNECTIONS_PER_PEER = 1
"""Connections per peer (any other value makes py-libp2p wait a fixed 250 ms on every dial). Soft:
py-libp2p trims a peer's extra connections only once they are older than its 20 s grace period
(`ConnectionConfig.grace_period`); the hard bounds are MAX_INBOUND_CONNECTIONS and MAX_CONNECTIONS."""
MAX_STREAMS_PER_CONNECTION = MAX_INBOUND_STREAMS_PER_CONNECTION
"""Inbound streams one connection (so one peer) may have in handlers at once (32); py-libp2p has no
such knob, kvnet.p2p.compat.handle_stream_capped adds it."""

# Per-address limits (identities are free, addresses less so). Checked by kvnet.p2p.compat section 4
# when a socket is accepted, before the Noise handshake; py-libp2p has none of them.
MAX_INBOUND_PER_IP = 16
"""Inbound connections open at once from one IPv4 address or one IPv6 /64 (a home or a host)."""
MAX_INBOUND_PER_SUBNET = 64
"""Inbound connections open at once from one IPv4 /24 or one IPv6 /48 (a site or a provider's block)."""
IPV4_SUBNET_BITS = 24
IPV6_ADDRESS_BITS = 64
"""An IPv6 'address' for the per-IP limit is its /64: one host usually holds a whole /64."""
IPV6_SUBNET_BITS = 48
IDLE_CONNECTION_S = 120.0
"""An inbound connection with no open stream for this long is closed (its slots freed). Connections
this node dialled itself are left alone: it dials only whom it needs."""
LIMIT_EXEMPT_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
"""Networks the per-address limits (connections and DHT slots) do not apply to: loopback, where a
devnet and the local agent all connect from."""


class LimitsError(InputError):
    """A ConnectionLimits value is unusable (a non-positive limit, an unparsable network)."""


@dataclass(frozen=True)
class ConnectionLimits:
    """Connection and per-address limits of one host (docs/security.md, "Connections and streams").

    Every field defaults to the module constant of the same meaning; a test shrinks `idle_s` or
    empties `exempt` to exercise the limits on loopback."""

    per_ip: int = MAX_INBOUND_PER_IP
    per_subnet: int = MAX_INBOUND_PER_SUBNET
    idle_s: float = IDLE_CONNECTION_S
    dht_per_ip: int = DHT_STREAMS_PER_IP
    streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
    exempt: tuple[str, ...] = LIMIT_EXEMPT_NETWORKS

    def __post_init__(self) -> None:
        for name in ("per_ip", "per_subnet", "dht_per_ip", "streams_per_connection"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LimitsError(f"ConnectionLimits.{name} must be a positive integer, not {value!r}")
        if not self.idle_s > 0:
            raise LimitsError(f"ConnectionLimits.idle_s must be positive, not {self.idle_s!r}")
        for net in self.exempt:
            try:
                ipaddress.ip_network(net)
            except ValueError as exc:
                raise LimitsError(f"ConnectionLimits.exempt: not a network: {net!r} ({exc})") from exc


def _ip(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of a socket's remote host (an IPv4-mapped IPv6 address as IPv4), or None."""
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class InboundGate:
    """Counts the inbound connections open per address and per subnet, and admits or refuses a new
    socket against ConnectionLimits (called by kvnet.p2p.compat.handle_inbound_until_closed when a
    socket is accepted; `release` when its connection closes). Also names the address key the DHT
    guard's per-IP slots use, so both limits agree on what "one address" is and what is exempt."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._exempt = tuple(ipaddress.ip_network(n) for n in limits.exempt)
        self.per_ip: dict[str, int] = {}
        self.per_subnet: dict[str, int] = {}
        self.refused = {"ip": 0, "subnet": 0}

    def keys(self, host: str | None) -> tuple[str, str] | None:
        """(address key, subnet key) of a remote host, or None when exempt or not an IP address."""
        ip = _ip(host)
        if ip is None or any(ip.version == n.version and ip in n for n in self._exempt):
            return None
        if ip.version == 4:
            return str(ip), str(ipaddress.ip_network(f"{ip}/{IPV4_SUBNET_BITS}", strict=False))
        return (str(ipaddress.ip_network(f"{ip}/{IPV6_ADDRESS_BITS}", strict=False)),
                str(ipaddress.ip_network(f"{ip}/{IPV6_SUBNET_BITS}", strict=False)))

    def address_key(self, host: str | None) -> str | None:
        """The per-IP key of a remote host (IPv4 address, IPv6 /64), or None when exempt."""
        keys = self.keys(host)
        return keys[0] if keys else None

    def admit(self, host: str | None) -> tuple[str, ...] | None:
        """Count a new inbound connection from `host`: the keys to `release` later (empty when
        exempt), or None when a limit is reached (the caller closes the socket unanswered)."""
        keys = self.keys(host)
        if keys is None:
            return ()
        ip, net = keys
        if self.per_ip.get(ip, 0) >= self.limits.per_ip:
            self.refused["ip"] += 1
            return None
        if self.per_subnet.get(net, 0) >= self.limits.per_subnet:
            self.refused["subnet"] += 1
            return None
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.per_subnet[net] = self.per_subnet.get(net, 0) + 1
        return keys

    def release(self, keys: tuple[str, ...]) -> None:
        """Give back what `admit` counted (a no-op for an exempt connection)."""
        if not keys:
            return
        for table, key in ((self.per_ip, keys[0]), (self.per_subnet, keys[1])):
            left = table.get(key, 0) - 1
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)

    def open_counts(self) -> tuple[int, int]:
        """(connections counted per address, per subnet), summed: both 0 once every counted one closed."""
        return sum(self.per_ip.values()), sum(self.per_subnet.values())


OverLimitHook = Callable[[str, str], Awaitable[None] | None]
"""Called with (peer id, which cap) when this host resets a peer's stream at a cap (the node scores
the peer down with it; kvnet.p2p.scores.PeerScores.over_limit rate-limits that)."""


def quiet_logs(level: int = logging.ERROR) -> None:
    """libp2p logs a spurious WARNING per DHT request; importing libp2p resets its logger, so call after."""
    logging.getLogger("libp2p").setLevel(level)


def keypair(key: CgPrivateKey) -> KeyPair:
    priv = Ed25519PrivateKey.from_bytes(key.private_bytes_raw())
    return KeyPair(priv, priv.get_public_key())


def peer_id_of(public_key: bytes) -> ID:
    """The libp2p peer ID of a raw Ed25519 public key (e.g. a manifest's publisher)."""
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key))


def public_key_of(peer: ID) -> bytes | None:
    """The raw Ed25519 public key embedded in a peer ID, if it has one."""
    pk = peer.extract_public_key()
    return pk.to_bytes() if isinstance(pk, Ed25519PublicKey) else None


def connection_config() -> ConnectionConfig:
    """py-libp2p's connection settings with kvnet's limits (module constants above).

    The watermarks keep upstream's relation (min <= low <= high <= max): pruning starts above
    MAX_CONNECTIONS only, which add_conn refuses anyway.
    """
    return ConnectionConfig(max_connections=MAX_CONNECTIONS, min_connections=OUTBOUND_RESERVE,
                            high_watermark=MAX_CONNECTIONS, max_connections_per_peer=MAX_CONNECTIONS_PER_PEER)


def make_host(key: CgPrivateKey, *, max_streams_per_connection: int | None = None,
              limits: ConnectionLimits | None = None, on_over_limit: OverLimitHook | None = None) -> IHost:
    """A host with only Noise and yamux negotiated (never plaintext or mplex), and kvnet's limits
    (`limits`, default ConnectionLimits(); `max_streams_per_connection` overrides its stream cap).
    `on_over_limit(peer, cap)` is told of every stream reset at a cap (see OverLimitHook)."""
    limits = limits or ConnectionLimits()
    kp = keypair(key)
    host = new_host(
        key_pair=kp,
        sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519().private_key)},
        muxer_opt={YAMUX_ID: GrantingYamux},
        connection_config=connection_config(),
    )
    swarm = host.get_network()
    set_max_inbound_streams(swarm, max_streams_per_connection or limits.streams_per_connection)
    set_inbound_gate(swarm, InboundGate(limits))
    set_idle_timeout(swarm, limits.idle_s)
    if on_over_limit is not None:
        set_over_limit_hook(swarm, on_over_limit)
    disable_auto_connect(swarm)
    quiet_logs()
    return host


REFUSED_HINT = "the peer closed the connection before the handshake: it may be at its connection limit"


def closed_before_handshake(exc: BaseException) -> bool:
    """Whether a dial failed because the peer accepted the TCP connection and closed it unanswered.

    That is what a node at its inbound connection limit does (py-libp2p closes the socket before the
    Noise handshake), and py-libp2p reports it as "failed to negotiate the secure protocol", which
    reads like a version mismatch. Walks the exception's groups, causes and py-libp2p `MultiError`s
    for a `SecurityUpgradeFailure` and, under it, an end of stream (`IncompleteReadError`) or a reset
    (`ConnectionClosedError`, `ConnectionResetError`: the node closed with our first bytes unread).
    """
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    security = eof = False
    while stack and len(seen) < 64:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        security = security or isinstance(e, SecurityUpgradeFailure)
        eof = eof or isinstance(e, IncompleteReadError | ConnectionClosedError | ConnectionResetError)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        stack.extend(x for x in getattr(e, "errors", None) or [] if isinstance(x, BaseException))
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return security and eof


def parse_addrs(addrs: Sequence[str]) -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(a) for a in addrs]


@asynccontextmanager
async def running(host: IHost, listen: Sequence[str]) -> AsyncIterator[None]:
    """`host.run(listen_addrs=...)` that fails with ListenError unless every address is listened on.

    py-libp2p 0.8.1's `host.run` ignores a failed listen (the swarm logs it at DEBUG and returns
    False), so a node told to listen on a taken port would run deaf. The error is raised after the
    host has shut down again, not inside its service nursery, so callers get a plain ListenError.
    On the way out the listeners are closed explicitly (kvnet.p2p.compat.close_listeners), so the
    port is free again once this returns.
    """
    maddrs = parse_addrs(listen)
    failed: list[str] = []
    async with host.run(listen_addrs=maddrs):
        listening = host.get_network().listeners
        failed = [str(m) for m in maddrs if str(m) not in listening]
        if not failed:
            try:
                yield
            finally:
                await close_listeners(host.get_network())
            return
    reasons = "; ".join(f"{a} ({_why_not_listening(a)})" for a in failed)
    raise ListenError(f"cannot listen on {reasons}")


def _why_not_listening(addr: str) -> str:
    """The OS's reason a TCP address cannot be bound (a diagnostic probe: it binds and closes)."""
    try:
        m = multiaddr.Multiaddr(addr)
        port = int(m.value_for_protocol("tcp"))
        for proto, family in (("ip4", socket.AF_INET), ("ip6", socket.AF_INET6)):
            try:
                ip = m.value_for_protocol(proto)
            except Exception:  # noqa: BLE001 - multiaddr raises its own lookup error
                continue
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((ip, port))
            return "the address is free now: it was taken or unusable a moment ago"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "address already in use: is another node listening there?"
        return exc.strerror or str(exc)
    except Exception as exc:  # noqa: BLE001 - a non-TCP or malformed address
        return f"not a TCP address kvnet can listen on: {exc}"
    return "not an ip4/ip6 TCP address"


def peer_info(addr: str) -> PeerInfo:
    """A PeerInfo from a full multiaddr ending in /p2p/<peer id>, with a clear error otherwise."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:  # noqa: BLE001 - multiaddr raises several types
        raise ValueError(f"not a peer address (want /ip4/.../tcp/N/p2p/<id>): {addr!r}: {exc}") from exc
