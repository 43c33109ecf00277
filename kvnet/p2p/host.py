"""libp2p host construction: one persisted Ed25519 identity, Noise + yamux over TCP, no dial delay.

The node's key file (from `kvnet keygen`) is the libp2p identity, so a publisher's peer ID embeds
the same Ed25519 public key that signs its manifests.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

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

from kvnet.errors import ListenError
from kvnet.p2p.compat import (
    MAX_INBOUND_STREAMS_PER_CONNECTION,
    YAMUX_RECEIVE_WINDOW,
    GrantingYamux,
    close_listeners,
    disable_auto_connect,
    set_max_inbound_streams,
)

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


def make_host(key: CgPrivateKey, *, max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION) -> IHost:
    """A host with only Noise and yamux negotiated (never plaintext or mplex), and kvnet's limits."""
    kp = keypair(key)
    host = new_host(
        key_pair=kp,
        sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519().private_key)},
        muxer_opt={YAMUX_ID: GrantingYamux},
        connection_config=connection_config(),
    )
    set_max_inbound_streams(host.get_network(), max_streams_per_connection)
    disable_auto_connect(host.get_network())
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
