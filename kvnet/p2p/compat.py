"""Every patch or extension of py-libp2p internals lives here, and only here.

kvnet pins py-libp2p 0.8.1 (`UPSTREAM_VERSION`). Each entry below says why it exists, what upstream
code it relies on, and which test pins that code's shape (tests/p2p/test_compat_pins.py fails as soon
as an upgrade changes what a patch assumes, instead of the patch silently doing nothing). Importing
this module applies the module-level patches; kvnet/p2p/host.py imports it before building a host.
"""

from __future__ import annotations

import logging
from typing import Any

import libp2p.kad_dht.common as _kad_common
import libp2p.kad_dht.kad_dht as _kad
import libp2p.kad_dht.peer_routing as _kad_routing
import libp2p.kad_dht.provider_store as _kad_providers
import libp2p.kad_dht.value_store as _kad_values
import libp2p.stream_muxer.muxer_multistream as _muxer_multistream
import libp2p.transport.tcp.tcp as _tcp
import trio
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

UPSTREAM_VERSION = "0.8.1"

log = logging.getLogger("kvnet.p2p.compat")

# -- 1. yamux: grant a larger receive window by WINDOW_UPDATE, never assume one -------------------

YAMUX_SPEC_WINDOW = 256 * 1024
"""The yamux spec's initial stream window, in both directions, before any WINDOW_UPDATE."""

YAMUX_RECEIVE_WINDOW = 4 * 1024 * 1024
"""What a kvnet node grants each stream it opens or accepts (measured on loopback: 256 KiB windows
stall bulk piece transfer on a window update every 256 KiB; 4 MiB keeps one 1 MiB piece and the
next few in flight)."""


async def grant_receive_window(stream: YamuxStream, window: int = YAMUX_RECEIVE_WINDOW) -> int:
    """Raise a stream's receive window to `window` by sending the peer a WINDOW_UPDATE; return the
    increment sent (0 if the window is already that large or the stream is closed).

    Why: py-libp2p 0.8.1 has no option for the initial window other than the module constant
    `DEFAULT_WINDOW_SIZE`, which sets BOTH the credit it grants and the credit it assumes the peer
    granted. Raising that constant (what kvnet did before) makes the sender exceed the 256 KiB the
    spec promises, and go/js/rust yamux drop such connections. The spec's way is for the receiver
    to announce extra credit; the sender then only spends what it was granted, which 0.8.1's
    `YamuxStream.write` already does (it never sends more than `send_window`).

    Relies on (0.8.1): `YamuxStream.window_lock`, `.recv_window` (credit granted minus bytes
    received), `.target_recv_window` (the window auto-tuning keeps topping up to), and
    `.send_window_update(increment)`.
    """
    if stream.closed or stream.reset_received:
        return 0
    async with stream.window_lock:
        increment = window - stream.target_recv_window
        if increment <= 0:
            return 0
        # Book the credit before announcing it, so our accounting never runs behind the peer's.
        stream.target_recv_window = window
        stream.recv_window += increment
    await stream.send_window_update(increment)
    return increment


class GrantingYamux(Yamux):
    """py-libp2p's yamux with the spec's 256 KiB initial window, plus a WINDOW_UPDATE right after a
    stream is opened (after the SYN) or accepted (after the ACK) that grants `YAMUX_RECEIVE_WINDOW`.

    Frames on a connection are ordered, so the peer sees the grant before it can have read our
    request on a stream we opened; on a stream we accepted, the grant follows the ACK. Auto-tuning
    and the per-read credit release of upstream then keep the window topped up as we read.

    Installed by `apply()` as the class `MuxerMultistream.new_conn` builds: py-libp2p 0.8.1 ignores
    the class given in `new_host(muxer_opt=...)` for `/yamux/1.0.0` and calls the module global
    `libp2p.stream_muxer.muxer_multistream.Yamux(conn, peer_id, is_initiator=..., on_close=...)`.
    """

    async def open_stream(self) -> YamuxStream:
        stream = await super().open_stream()
        await _grant_or_log(stream)
        return stream

    async def accept_stream(self) -> Any:
        stream = await super().accept_stream()
        if isinstance(stream, YamuxStream):
            await _grant_or_log(stream)
        return stream


async def _grant_or_log(stream: YamuxStream) -> None:
    """A grant that cannot be written means the connection is going down: the stream then fails on
    its own first read or write, so the muxer's open/accept path must not fail differently here."""
    try:
        await grant_receive_window(stream)
    except Exception as exc:  # noqa: BLE001 - transports raise several types for a dead connection
        log.debug("yamux window grant on stream %s failed: %r", stream.stream_id, exc)


# -- 2. TCP: listen exclusively, and close listeners when the host stops ----------------------------


async def open_exclusive_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    """Replacement for `libp2p.transport.tcp.tcp._open_reuseport_listeners`.

    Why: py-libp2p 0.8.1 listens with SO_REUSEPORT (for TCP hole punching, which kvnet does not
    use), so on Linux a second `kvnet serve` on a port already in use binds it too and the kernel
    splits incoming connections between two unrelated nodes. `trio.open_tcp_listeners` sets only
    SO_REUSEADDR (restart while old connections linger in TIME_WAIT), so binding a port another
    socket listens on fails with EADDRINUSE, which the swarm reports as a failed listen.

    Relies on (0.8.1): `TCPListener.listen` calling the module global `_open_reuseport_listeners`
    with (host or None, port) and serving the listeners it returns.
    """
    return list(await trio.open_tcp_listeners(port, host=host))


_UPSTREAM_OPEN_LISTENERS = _tcp._open_reuseport_listeners

LISTENER_CLOSE_TIMEOUT = 5.0


async def close_listeners(network: Any) -> None:
    """Close a swarm's listeners, shielded from the cancellation that is stopping the host.

    Why: py-libp2p 0.8.1's swarm closes its listeners in a `finally` that runs while its service is
    being cancelled, so `await listener.close()` is cancelled at once and the listening socket stays
    open (still accepting, in a system task) after the host has stopped. A node restarted in the
    same process then cannot bind its port (or, with upstream's SO_REUSEPORT, shares it with the dead
    listener). Call this while the host is still running, just before leaving `host.run`.

    Relies on (0.8.1): `Swarm.listeners` (address -> listener) and `TCPListener.close()`, which
    still works after the swarm stopped. Pinned by test_compat_pins (the leak is still there, and
    this closes it) and test_wire_listen (a port is free again once `running` returns).
    """
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + LISTENER_CLOSE_TIMEOUT
        for listener in list(network.listeners.values()):
            try:
                await listener.close()
            except Exception as exc:  # noqa: BLE001 - shutting down: log and go on
                log.debug("closing listener failed: %r", exc)


# -- 3. Kademlia: a private protocol id, kvnet's own republishing, a provider rate that fits -------

DHT_MODULES_WITH_PROTOCOL_ID = (_kad_common, _kad, _kad_routing, _kad_providers, _kad_values)


def use_dht_protocol(protocol_id: str) -> None:
    """Make py-libp2p's Kademlia speak `protocol_id` instead of `/ipfs/kad/1.0.0`.

    Why: kvnet must never talk to (or trust records from) the public IPFS DHT. py-libp2p 0.8.1's
    `KadDHT` has no working option for this: five modules copy `PROTOCOL_ID` at import time
    (`from .common import PROTOCOL_ID`) and use their copy for handlers and dials, so every copy is
    replaced. Relies on (0.8.1): the module globals named in DHT_MODULES_WITH_PROTOCOL_ID.
    """
    for module in DHT_MODULES_WITH_PROTOCOL_ID:
        module.PROTOCOL_ID = protocol_id


def forget_provided_key(dht: Any, key: bytes) -> None:
    """Take `key` off py-libp2p's own re-provide list.

    Why: py-libp2p 0.8.1 remembers every key it provided (`ProviderStore.providing_keys`) and its
    maintenance loop re-provides them all about ten minutes after start and then every 22 h,
    including keys of artifacts evicted since. kvnet republishes from its store on its own schedule
    (docs/discovery.md). Relies on (0.8.1): `ProviderStore.providing_keys` being a set.
    """
    dht.provider_store.providing_keys.discard(key)


def set_provider_rate_limit(dht: Any, per_window: int) -> None:
    """Accept up to `per_window` ADD_PROVIDER messages per peer per window (10 s in 0.8.1).

    Why: upstream accepts 10 per peer per 10 s and resets the stream on the 11th. A kvnet node
    announces 1 + log2(blocks) records per artifact (up to 23), and in a small network every node is
    among the closest peers of every key, so one artifact's announcement already exceeds 10. kvnet
    nodes pace their own announcements below this limit (kvnet.p2p.node.ProvidePacer).
    Relies on (0.8.1): `KadDHT._provider_rate_max`, read by `_check_provider_rate_limit`.
    """
    dht._provider_rate_max = per_window


async def providers_from_peer(dht: Any, peer: Any, key: bytes) -> list[Any]:
    """Ask one peer (GET_PROVIDERS) for the providers of `key`; return their PeerInfos.

    Why: py-libp2p 0.8.1's public `find_providers` answers from the local provider store (our own
    record, results cached from earlier lookups) without asking the network, so a node that held
    part of an artifact never found the others. Relies on (0.8.1): the private
    `ProviderStore._get_providers_from_peer_with_closers(peer, key) -> (providers, closer_peers)`.
    """
    providers, _closer = await dht.provider_store._get_providers_from_peer_with_closers(peer, key)
    return list(providers)


def provider_rate_window(dht: Any) -> float:
    """Seconds of py-libp2p's ADD_PROVIDER rate window (`KadDHT._provider_rate_window`)."""
    return float(dht._provider_rate_window)


def apply() -> None:
    """Install the module-level patches (idempotent; done on import). They apply to every py-libp2p
    host in this process, which is what kvnet wants: a kvnet process only runs kvnet hosts."""
    _muxer_multistream.Yamux = GrantingYamux
    _tcp._open_reuseport_listeners = open_exclusive_listeners


apply()
