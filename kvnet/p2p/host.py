"""libp2p host construction: one persisted Ed25519 identity, Noise + yamux over TCP, no dial delay.

The node's key file (from `kvnet keygen`) is the libp2p identity, so a publisher's peer ID embeds
the same Ed25519 public key that signs its manifests.
"""

from __future__ import annotations

import logging

import libp2p.stream_muxer.yamux.yamux as _yamux
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
from libp2p.stream_muxer.yamux.yamux import Yamux

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"

# yamux's initial stream window (256 KiB in py-libp2p) throttles bulk piece transfer: the sender
# stalls for a window update every 256 KiB until auto-tuning catches up. Every kvnet node starts its
# streams at 4 MiB instead (measured: 134 -> 158 MB/s for one provider on loopback, see
# docs/benchmarks.md). Both ends must agree, which they do: kvnet hosts only talk to kvnet hosts.
YAMUX_INITIAL_WINDOW = 4 * 1024 * 1024
_yamux.DEFAULT_WINDOW_SIZE = YAMUX_INITIAL_WINDOW


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
        muxer_opt={YAMUX_ID: Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    quiet_logs()
    return host


def parse_addrs(addrs: list[str]) -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(a) for a in addrs]


def peer_info(addr: str) -> PeerInfo:
    """A PeerInfo from a full multiaddr ending in /p2p/<peer id>, with a clear error otherwise."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:  # noqa: BLE001 - multiaddr raises several types
        raise ValueError(f"not a peer address (want /ip4/.../tcp/N/p2p/<id>): {addr!r}: {exc}") from exc
