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
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID

from kvnet.errors import ListenError
from kvnet.p2p.compat import YAMUX_RECEIVE_WINDOW, GrantingYamux, close_listeners

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"

# Streams start at the yamux spec's 256 KiB window in both directions; each kvnet node then grants
# YAMUX_RECEIVE_WINDOW (4 MiB) to its peer with a WINDOW_UPDATE (kvnet.p2p.compat.GrantingYamux), so
# bulk transfer between kvnet nodes runs at 4 MiB windows while a stock go/js/rust/py peer is never
# sent more than it granted.
YAMUX_INITIAL_WINDOW = YAMUX_RECEIVE_WINDOW


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


def make_host(key: CgPrivateKey) -> IHost:
    """A host with only Noise and yamux negotiated (never plaintext or mplex)."""
    kp = keypair(key)
    host = new_host(
        key_pair=kp,
        sec_opt={NOISE_ID: NoiseTransport(kp, noise_privkey=create_x25519().private_key)},
        muxer_opt={YAMUX_ID: GrantingYamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    quiet_logs()
    return host


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
