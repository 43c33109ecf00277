"""Every patch or extension of py-libp2p internals lives here, and only here.

kvnet pins py-libp2p 0.8.1 (`UPSTREAM_VERSION`). Each entry below says why it exists, what upstream
code it relies on, and which test pins that code's shape (tests/p2p/test_compat_pins.py fails as soon
as an upgrade changes what a patch assumes, instead of the patch silently doing nothing). Importing
this module applies the module-level patches; kvnet/p2p/host.py imports it before building a host.
"""

from __future__ import annotations

import contextlib
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
from libp2p.stream_muxer.exceptions import MuxedConnUnavailable
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

FRAME_WRITE_DEADLINE_S = 10.0
"""How long one yamux frame's write may take before the connection is closed (see
`GrantingYamux._write_frame`: a frame is written whole or the connection goes down)."""


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

    async def _write_frame(self, data: bytes) -> None:
        """Write one frame whole, or close the connection.

        Upstream writes a frame with `secured_conn.write` in the caller's task, so cancelling the
        caller (a timeout, a fetch that finished and cancels its helpers) can stop the write halfway:
        part of a Noise message is on the wire, and every later frame on the connection is garbage to
        the peer. The next stream to that peer then failed with "handshake write failed" (seen when a
        fetch cancelled a payment on its way: tests/p2p/test_paid_hosting.py). So the write itself is
        shielded from the caller's cancellation, bounded by FRAME_WRITE_DEADLINE_S; a cancellation
        that arrived meanwhile is delivered right after. A write that cannot finish in time has broken
        the framing anyway: the connection is closed and the write fails.
        """
        async with self._write_lock:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FRAME_WRITE_DEADLINE_S
                await self.secured_conn.write(data)
            if scope.cancelled_caught:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self.secured_conn.close()
                raise MuxedConnUnavailable(f"a yamux frame write took over {FRAME_WRITE_DEADLINE_S:g} s: "
                                           "connection closed")
        await trio.lowlevel.checkpoint()


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


def provider_rate_window(dht: Any) -> float:
    """Seconds of py-libp2p's ADD_PROVIDER rate window (`KadDHT._provider_rate_window`)."""
    return float(dht._provider_rate_window)


def apply() -> None:
    """Install the module-level patches (idempotent; done on import). They apply to every py-libp2p
    host in this process, which is what kvnet wants: a kvnet process only runs kvnet hosts."""
    _muxer_multistream.Yamux = GrantingYamux
    _tcp._open_reuseport_listeners = open_exclusive_listeners


apply()


# -- 4. swarm: inbound slots freed on close, per-address limits, idle close, one inbound connection
#       per peer, streams capped per connection (peers over a cap reported), no auto-dialing, closed
#       connections unregistered before kvnet opens a stream --------------------------------------

import inspect  # noqa: E402

import libp2p.network.connection.swarm_connection as _swarm_conn  # noqa: E402 - this section's upstream
import libp2p.network.swarm as _swarm  # noqa: E402 - this section's own upstream module
from libp2p.rcmgr import Direction as _rcmgr_direction  # noqa: E402 - SwarmConn.direction's type

_UPSTREAM_DO_HANDLE_INBOUND = _swarm.Swarm._do_handle_inbound_connection


async def wait_connection_closed(swarm: Any, muxed_conn: Any) -> None:
    """Return when `muxed_conn` has closed (either side, or an error), or when the swarm stops.

    Relies on (0.8.1): yamux's `Yamux.event_closed` (a trio.Event set by `close()` and by
    `_cleanup_on_error()` when the peer goes away) and `swarm.manager.wait_finished()`. A muxer
    without `event_closed` falls back to upstream's wait for the swarm to stop.
    """
    closed = getattr(muxed_conn, "event_closed", None)
    if not isinstance(closed, trio.Event):
        await swarm.manager.wait_finished()
        return
    async with trio.open_nursery() as nursery:

        async def swarm_stopped() -> None:
            await swarm.manager.wait_finished()
            nursery.cancel_scope.cancel()

        nursery.start_soon(swarm_stopped)
        await closed.wait()
        nursery.cancel_scope.cancel()


async def handle_inbound_until_closed(self: Any, read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
    """Replacement for `Swarm._do_handle_inbound_connection`: per-address limits before the handshake,
    one inbound connection per peer, idle connections closed, and a return when the connection closes.

    Why: py-libp2p 0.8.1 caps inbound connections with `Swarm._inbound_limiter` (a CapacityLimiter of
    max_connections - min_connections tokens, 300 - 50 = 250 by default). `_handle_inbound_connection`
    takes a token per accepted socket and gives it back when `_do_handle_inbound_connection` returns,
    but that function ends with `await self.manager.wait_finished()`, the "keep the handler alive"
    barrier, which only returns when the whole host stops. So every inbound connection kept its token
    (and its handler task) after it closed, and after 250 connections over its lifetime a node
    refused every new one for good. The barrier itself is needed: trio's `serve_listeners` closes the
    socket when the handler returns. So this waits for the connection to close instead
    (`serve_inbound_connection`). Upstream has no per-address limit, no idle timeout and lets a peer
    hold extra connections for a 20 s grace period; kvnet adds them here (the gate of `set_inbound_gate`,
    `serve_inbound_connection`). Otherwise it is upstream's code, unchanged.

    Relies on (0.8.1): the body of `_do_handle_inbound_connection` (pinned by the hash of its source in
    tests/p2p/test_compat_pins_swarm.py), `upgrade_inbound_raw_conn` returning the muxed connection
    after `add_conn` registered it, the raw stream's `get_remote_address()` -> (host, port), and the
    module globals `RawConnection`, `IMuxedConn`, `cast` and `logger` of libp2p.network.swarm.
    """
    gate = getattr(self, "_kvnet_inbound_gate", None)
    counted: tuple[str, ...] = ()
    remote = _remote_host(read_write_closer)
    if gate is not None:
        admitted = gate.admit(remote)
        if admitted is None:  # over a per-address limit: closed before any handshake byte
            _swarm.logger.debug("Inbound connection from %s refused: per-address limit", remote)
            with contextlib.suppress(Exception):  # best-effort close, as upstream's
                await read_write_closer.close()
            return
        counted = admitted
    try:
        await _handle_inbound(self, read_write_closer, maddr, failure_event, remote)
    finally:
        if gate is not None:
            gate.release(counted)


def _remote_host(read_write_closer: Any) -> str | None:
    """The remote IP of an accepted socket, or None (a transport without one is never limited).

    py-libp2p 0.8.1's `TrioTCPStream.get_remote_address` returns None for every IPv6 peer (it accepts
    only a 2-tuple from getpeername, and IPv6 gives 4), which would exempt all of IPv6 from the
    limits; so the trio socket under it is asked directly. Relies on (0.8.1): `TrioTCPStream.stream`
    being the trio SocketStream, whose `.socket` has getpeername().
    """
    try:
        remote = read_write_closer.get_remote_address()
        if remote:
            return str(remote[0])
        return str(read_write_closer.stream.socket.getpeername()[0])
    except Exception:  # noqa: BLE001 - a transport may not know it, or the socket is gone already
        return None


async def _handle_inbound(self: Any, read_write_closer: Any, maddr: Any, failure_event: Any,
                          remote: str | None) -> None:
    """Upstream's `_do_handle_inbound_connection` body, its two barriers replaced by
    `serve_inbound_connection` (see handle_inbound_until_closed)."""
    remote_maddr = self._build_remote_multiaddr(read_write_closer)
    if remote_maddr is not None and not await self.connection_gate.is_allowed(remote_maddr):
        _swarm.logger.debug("Inbound connection from %s denied by connection gate", remote_maddr)
        with contextlib.suppress(Exception):  # upstream's best-effort close
            await _close_and_count_failure(self, read_write_closer, failure_event)
        return

    if isinstance(read_write_closer, _swarm.IMuxedConn):  # QUIC and the like: already multiplexed
        try:
            muxed_conn = _swarm.cast(_swarm.IMuxedConn, read_write_closer)
            await self.add_conn(muxed_conn, direction="inbound")
            await serve_inbound_connection(self, muxed_conn, remote)
        except Exception:  # noqa: BLE001 - upstream's handling: close and count the failure
            await _close_and_count_failure(self, read_write_closer, failure_event)
        return

    raw_conn = None
    try:
        raw_conn = _swarm.RawConnection(read_write_closer, False)
        muxed_conn = await self.upgrade_inbound_raw_conn(raw_conn, maddr)
        await serve_inbound_connection(self, muxed_conn, remote)
    except Exception as e:  # noqa: BLE001 - upstream's handling: close and count the failure
        _swarm.logger.debug("Error handling incoming connection: %s", e)
        try:
            if raw_conn is not None:
                await raw_conn.close()
            else:
                await _close_and_count_failure(self, read_write_closer, failure_event)
        except Exception:  # noqa: BLE001 - upstream's best-effort close
            pass


async def _close_and_count_failure(swarm: Any, closer: Any, failure_event: Any) -> None:
    """Upstream's three copies of "close the socket, mark the inbound failure, report it to metrics"."""
    await closer.close()
    failure_event.conn_incoming_error = True
    if swarm.metric_send_channel is not None:
        await swarm.metric_send_channel.send(failure_event)


def _swarm_conn_of(swarm: Any, muxed_conn: Any) -> Any:
    """The SwarmConn `add_conn` registered for `muxed_conn` (None if it is already gone)."""
    for conn in swarm.get_connections(muxed_conn.peer_id):
        if conn.muxed_conn is muxed_conn:
            return conn
    return None


def _is_inbound(conn: Any) -> bool:
    return getattr(conn, "direction", None) == _rcmgr_direction.INBOUND


async def close_older_inbound(swarm: Any, conn: Any) -> int:
    """Close the peer's other *inbound* connections now that `conn` (inbound) is registered; return
    how many. One connection per peer, at once rather than after py-libp2p's 20 s grace period.

    Why the older ones go: Noise proves the peer id, so only the peer itself can open a second
    connection, and an honest py-libp2p peer dials a peer it is connected to only when it believes
    the old connection dead (its dial reuses an open connection and waits for one in flight). A peer
    that restarted, or whose network changed, reconnects before this node notices the old TCP
    connection is gone: keeping the old one would lock it out. Connections this node dialled are
    never touched, so a simultaneous dial (each node dialled the other: one inbound and one
    outbound connection on each side) is left to py-libp2p, which keeps both until its trim.
    Relies on (0.8.1): `Swarm.get_connections(peer_id)`, `SwarmConn.direction` (libp2p.rcmgr
    Direction) and `SwarmConn.close()`.
    """
    older = [c for c in swarm.get_connections(conn.muxed_conn.peer_id)
             if c is not conn and _is_inbound(c) and not c.is_closed]
    for old in older:
        swarm._kvnet_replaced_connections = getattr(swarm, "_kvnet_replaced_connections", 0) + 1
        try:
            with trio.CancelScope(shield=True) as scope:  # a close cut short leaves it registered
                scope.deadline = trio.current_time() + LISTENER_CLOSE_TIMEOUT
                await old.close()
        except Exception as exc:  # noqa: BLE001 - it may be closing already
            log.debug("closing a replaced connection failed: %r", exc)
    return len(older)


def set_idle_timeout(swarm: Any, seconds: float) -> None:
    """Close this swarm's inbound connections after `seconds` with no open stream (see close_when_idle)."""
    swarm._kvnet_idle_s = seconds


IDLE_POLLS = 8
"""While a connection has streams open, the idle watch looks every idle_s / IDLE_POLLS seconds."""


def _busy(conn: Any) -> bool:
    """Whether a connection has a stream open: one in a handler here, or one this node opened."""
    return bool(getattr(conn, "_kvnet_inbound_streams", 0)) or bool(conn.streams)


async def close_when_idle(conn: Any, idle_s: float) -> None:
    """Close the inbound connection `conn` once it has had no open stream for `idle_s` seconds.

    Why: py-libp2p 0.8.1 never closes an idle connection, so 250 strangers that each passed one Noise
    handshake held every inbound slot for good. Inbound streams stamp their start and end
    (`handle_stream_capped`), so their idle time is exact; streams this node opened on the connection
    are seen by looking (`SwarmConn.streams`) every idle_s / IDLE_POLLS while any is open. A closed
    connection frees its inbound slot and address counts; the peer simply dials again when it needs
    to. Relies on (0.8.1): `SwarmConn.streams` (the NetStreams open on it, both directions),
    `.is_closed` and `.close()`.
    """
    last_busy = trio.current_time()
    while not conn.is_closed:
        now = trio.current_time()
        if _busy(conn):
            last_busy = now
            await trio.sleep(idle_s / IDLE_POLLS)
            continue
        idle_since = max(last_busy, getattr(conn, "_kvnet_last_stream_at", last_busy))
        if now - idle_since >= idle_s:
            conn.swarm._kvnet_idle_closed = getattr(conn.swarm, "_kvnet_idle_closed", 0) + 1
            # Shielded: closing the muxer ends the handler's wait, which cancels this watch; a close
            # cut short there would leave the closed connection registered in the swarm for good.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + LISTENER_CLOSE_TIMEOUT
                await conn.close()
            return
        await trio.sleep(idle_since + idle_s - now)


async def serve_inbound_connection(swarm: Any, muxed_conn: Any, remote: str | None = None) -> None:
    """Hold an inbound connection's handler until the connection closes (freeing its inbound slot):
    first close the peer's older inbound connections (`close_older_inbound`), then watch it for
    idleness (`close_when_idle`, when the swarm has an idle timeout). The remote IP is kept on the
    SwarmConn (`_kvnet_remote_host`) for the DHT guard's per-address slots."""
    conn = _swarm_conn_of(swarm, muxed_conn)
    idle_s = getattr(swarm, "_kvnet_idle_s", None)
    if conn is None:
        await wait_connection_closed(swarm, muxed_conn)
        return
    conn._kvnet_remote_host = remote
    await close_older_inbound(swarm, conn)
    async with trio.open_nursery() as nursery:
        if idle_s is not None:
            nursery.start_soon(close_when_idle, conn, idle_s)
        await wait_connection_closed(swarm, muxed_conn)
        nursery.cancel_scope.cancel()


def set_inbound_gate(swarm: Any, gate: Any) -> None:
    """Admit this swarm's inbound sockets through `gate` (kvnet.p2p.host.InboundGate): `admit(host)`
    returns the keys counted, or None to refuse; `release(keys)` when the connection has closed."""
    swarm._kvnet_inbound_gate = gate


def set_over_limit_hook(swarm: Any, hook: Any) -> None:
    """Tell `hook(peer, cap)` (sync or async) about each stream this swarm resets at a per-peer cap."""
    swarm._kvnet_on_over_limit = hook


async def report_over_limit(swarm: Any, peer: str, cap: str) -> None:
    """Call the swarm's over-limit hook, if any; never raises (scoring must not break the refusal)."""
    hook = getattr(swarm, "_kvnet_on_over_limit", None)
    if hook is None:
        return
    try:
        result = hook(peer, cap)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:  # noqa: BLE001 - logged; the refusal itself already happened
        log.debug("over-limit hook for %s (%s) failed: %r", peer, cap, exc)


def inbound_slots_in_use(swarm: Any) -> int:
    """Inbound connection slots taken now (`Swarm._inbound_limiter.borrowed_tokens`, 0.8.1)."""
    return int(swarm._inbound_limiter.borrowed_tokens)


def inbound_slots_total(swarm: Any) -> int:
    """Inbound connection slots in all (`Swarm._inbound_limiter.total_tokens`, 0.8.1)."""
    return int(swarm._inbound_limiter.total_tokens)


MAX_INBOUND_STREAMS_PER_CONNECTION = 32
"""Inbound streams a connection may have in its handlers at once; the next is reset at once. With
one connection per peer (kvnet.p2p.host.MAX_CONNECTIONS_PER_PEER) this is a per-peer cap. An honest
kvnet peer uses at most a handful (a fetch keeps 4 piece requests in flight per provider, plus an
offer and a few DHT requests)."""

_UPSTREAM_HANDLE_MUXED_STREAM = _swarm_conn.SwarmConn._handle_muxed_stream


def set_max_inbound_streams(swarm: Any, limit: int) -> None:
    """Cap the inbound streams of each of this swarm's connections at `limit` (see handle_stream_capped)."""
    swarm._kvnet_max_inbound_streams = limit


async def handle_stream_capped(self: Any, muxed_stream: Any) -> None:
    """Wrapper of `SwarmConn._handle_muxed_stream` that resets an inbound stream over the cap.

    Why: py-libp2p 0.8.1 has no per-connection (or per-peer) stream limit: its resource manager
    counts streams for the whole host (10,000 by default), so one peer could take them all, and each
    stream it opens is a task running a protocol handler. Streams over the cap are reset before any
    handler or protocol negotiation runs, counted in `SwarmConn._kvnet_refused_streams`, and reported
    to the swarm's over-limit hook (the node scores the peer down, rate-limited). Admitted streams
    stamp `_kvnet_last_stream_at` when they start and end, for `close_when_idle`.

    Relies on (0.8.1): `SwarmConn._handle_new_streams` starting one `_handle_muxed_stream(stream)`
    task per accepted stream that runs the protocol handler to its end, and `.swarm` on SwarmConn.
    """
    limit = getattr(self.swarm, "_kvnet_max_inbound_streams", MAX_INBOUND_STREAMS_PER_CONNECTION)
    active = getattr(self, "_kvnet_inbound_streams", 0)
    if active >= limit:
        self._kvnet_refused_streams = getattr(self, "_kvnet_refused_streams", 0) + 1
        try:
            await muxed_stream.reset()
        except Exception as exc:  # noqa: BLE001 - the connection may be going down
            log.debug("resetting a stream over the cap failed: %r", exc)
        await report_over_limit(self.swarm, str(self.muxed_conn.peer_id), "streams_per_connection")
        return
    self._kvnet_inbound_streams = active + 1
    self._kvnet_last_stream_at = trio.current_time()
    try:
        await _UPSTREAM_HANDLE_MUXED_STREAM(self, muxed_stream)
    finally:
        self._kvnet_inbound_streams -= 1
        self._kvnet_last_stream_at = trio.current_time()


async def _auto_connector_stays_stopped() -> None:
    """`AutoConnector.start` for a kvnet host: leaves `_started` False (see disable_auto_connect)."""


def disable_auto_connect(swarm: Any) -> None:
    """Keep py-libp2p's auto-connector off for this swarm.

    Why: py-libp2p 0.8.1 dials peers from the peerstore whenever a host has fewer connections than
    (low_watermark + high_watermark) / 2 (200 by default): on each disconnect and every 30 s. For a
    kvnet node after churn those are departed peers (every `kvnet fetch` that bootstrapped off it
    leaves its address): up to 200 failed dials a round, each an fd, a task and an error log line.
    kvnet keeps its routing table itself (DHT refresh) and dials only whom it asks. No option turns the
    connector off (watermarks of 0 would make the pruner close every connection), so its `start` is
    replaced on this instance: `_started` stays False, and both `run_background_task` and
    `maybe_connect` return at once. Relies on (0.8.1): `Swarm.auto_connector`, `AutoConnector.start`
    setting `_started`, and the `if not self._started: return` guards of the other two.
    """
    swarm.auto_connector.start = _auto_connector_stays_stopped




def prune_closed_connections(swarm: Any, peer_id: Any) -> int:
    """Unregister `peer_id`'s connections that are closed but still registered; how many were.

    Why: py-libp2p 0.8.1's `Swarm.new_stream` dials only when `get_connections(peer)` is empty, then
    filters out closed connections and raises "No valid connections available" if none is left. A
    connection whose close was cut short between closing its muxer and unregistering it (upstream's
    `SwarmConn.close` order, docs/upstream.md section 11) stays registered and closed for good, so every
    later stream to that peer failed without a dial: in a 5-node devnet an agent lost its only honest
    provider that way in about half the runs. Unregistering them (upstream's own `remove_conn`, which
    does not close anything) lets `new_stream` dial afresh. Relies on (0.8.1): `get_connections(peer)`,
    `SwarmConn.is_closed` and `Swarm.remove_conn(swarm_conn)`.
    """
    stale = [c for c in swarm.get_connections(peer_id) if getattr(c, "is_closed", False)]
    for conn in stale:
        swarm.remove_conn(conn)
    return len(stale)


def apply_swarm_patches() -> None:
    """Install section 4's module-level patches (idempotent)."""
    _swarm.Swarm._do_handle_inbound_connection = handle_inbound_until_closed
    _swarm_conn.SwarmConn._handle_muxed_stream = handle_stream_capped


apply_swarm_patches()


# -- 5. Kademlia server: deadlines, one request per stream, per-peer and total handler caps --------


class _OneRequestStream:
    """What py-libp2p's DHT handler reads from: the one request the guard already read, then end of
    stream. Everything else (write, close, reset, muxed_conn, ...) goes to the real stream.

    Why: upstream's handler loops reading request after request on one stream, so a pipelining peer
    kept a handler busy forever (336 answers/s) and an unknown type left the stream open; with
    this, the handler answers one request and then sees a clean EOF, closing the stream.
    """

    def __init__(self, stream: Any, request: bytes) -> None:
        self._stream, self._buffer = stream, request

    async def read(self, n: int | None = None) -> bytes:
        if n is None or n < 0:
            n = len(self._buffer)
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class DhtGuard:
    """Admission and deadlines for one node's DHT handler (see `guard_dht_handler`)."""

    def __init__(self, dht: Any) -> None:
        from kvnet.p2p import dht_limits as limits

        self.dht, self.limits = dht, limits
        self.total = trio.CapacityLimiter(limits.DHT_HANDLERS_MAX)
        self.per_peer: dict[str, trio.CapacityLimiter] = {}
        self.waiting: dict[str, int] = {}
        # per address (the host's InboundGate says what one address is, and what is exempt)
        self.gate = getattr(dht.host.get_network(), "_kvnet_inbound_gate", None)
        gate_limits = getattr(self.gate, "limits", None)
        self.per_ip_max = getattr(gate_limits, "dht_per_ip", limits.DHT_STREAMS_PER_IP)
        self.per_ip: dict[str, trio.CapacityLimiter] = {}
        self.ip_streams: dict[str, int] = {}  # streams of an address in the guard (waiting or served)
        self.validations = trio.CapacityLimiter(limits.VALUE_VALIDATIONS_AT_ONCE)
        self.refused = 0  # streams reset by a rule or a deadline
        self.timed_out = 0  # of which by a deadline
        self.queued = 0  # streams that found their peer's slots all taken and waited
        self.over_peer_cap = 0  # streams reset because their peer already had DHT_QUEUED_PER_PEER waiting

    async def _reset(self, stream: Any) -> None:
        self.refused += 1
        discard_unread(stream)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + 1.0
            try:
                await stream.reset()
            except Exception as exc:  # noqa: BLE001 - the connection may be gone already
                log.debug("DHT stream reset failed: %r", exc)

    def _address(self, stream: Any) -> str | None:
        """The per-IP key of the stream's remote address; None when exempt or unknown. An inbound
        connection carries the address its socket was admitted with (IPv6 included, see
        `_remote_host`); for one this node dialled, the stream's own address is asked."""
        if self.gate is None:
            return None
        host = getattr(getattr(stream, "swarm_conn", None), "_kvnet_remote_host", None)
        if host is None:
            try:
                remote = stream.get_remote_address()
            except Exception:  # noqa: BLE001 - a transport may not know it
                remote = None
            host = str(remote[0]) if remote else None
        return self.gate.address_key(host)

    def _limiters(self, peer: str, ip: str | None) -> list[trio.CapacityLimiter]:
        """The slots a stream must hold, in the order taken: its peer's, its address's, the total."""
        slot = self.per_peer.setdefault(peer, trio.CapacityLimiter(self.limits.DHT_STREAMS_PER_PEER))
        if ip is None:
            return [slot, self.total]
        self.ip_streams[ip] = self.ip_streams.get(ip, 0) + 1
        return [slot, self.per_ip.setdefault(ip, trio.CapacityLimiter(self.per_ip_max)), self.total]

    def _forget(self, peer: str, ip: str | None) -> None:
        """Drop the per-peer and per-address entries nobody holds or waits for (the tables stay
        bounded by the streams in the guard, however many identities and addresses come and go)."""
        slot = self.per_peer.get(peer)
        if self.waiting.get(peer) == 0 and slot is not None and slot.borrowed_tokens == 0:
            self.waiting.pop(peer, None)
            self.per_peer.pop(peer, None)
        if ip is not None:
            self.ip_streams[ip] -= 1
            if self.ip_streams[ip] == 0:
                del self.ip_streams[ip]
                self.per_ip.pop(ip, None)

    async def handle(self, stream: Any) -> None:
        """The DHT protocol handler: admit, read one request within the deadline, check it, let
        py-libp2p answer it, and reset the stream on any rule broken or deadline missed."""
        limits = self.limits
        peer = str(stream.muxed_conn.peer_id)
        if self.waiting.get(peer, 0) >= limits.DHT_QUEUED_PER_PEER:
            self.over_peer_cap += 1
            await self._reset(stream)
            await report_over_limit(self.dht.host.get_network(), peer, "dht_queued_per_peer")
            return
        ip = self._address(stream)
        limiters = self._limiters(peer, ip)
        self.waiting[peer] = self.waiting.get(peer, 0) + 1
        start = trio.current_time()
        held: list[trio.CapacityLimiter] = []
        served = False
        if limiters[0].available_tokens == 0:
            self.queued += 1
        try:
            with trio.move_on_at(start + limits.DHT_REQUEST_TIMEOUT_S):
                for limiter in limiters:
                    await limiter.acquire()
                    held.append(limiter)
            self.waiting[peer] -= 1
            if len(held) == len(limiters):
                try:
                    served = await self._serve(stream, peer, start)
                except Exception as exc:  # noqa: BLE001 - an escaping error would leave the stream open
                    log.debug("DHT handler for %s failed: %r", peer, exc)
                    served = True
                    await self._reset(stream)
        finally:
            for limiter in reversed(held):
                limiter.release()
            self._forget(peer, ip)
        if not served:
            self.timed_out += 1
            await self._reset(stream)

    async def _serve(self, stream: Any, peer: str, start: float) -> bool:
        """Read, check and answer one request; False means the request deadline passed."""
        from libp2p.kad_dht.pb.kademlia_pb2 import Message
        from libp2p.utils.varint import read_varint_prefixed_bytes_limited

        limits = self.limits
        with trio.move_on_at(start + limits.DHT_REQUEST_TIMEOUT_S) as reading:
            try:
                body = await read_varint_prefixed_bytes_limited(stream, limits.PUT_VALUE_MAX_BYTES)
                msg = Message()
                msg.ParseFromString(body)
                msg = limits.check_request(msg, len(body))
            except Exception as exc:  # noqa: BLE001 - malformed, oversized, truncated, refused
                log.debug("DHT request from %s refused: %r", peer, exc)
                await self._reset(stream)
                return True
        if reading.cancelled_caught:
            return False
        putting = msg.type == Message.MessageType.PUT_VALUE and msg.HasField("record")
        if putting and not await self._prevalidate(msg):
            await self._reset(stream)
            return True
        request = msg.SerializeToString()
        token = limits.current_peer.set(peer)
        try:
            with trio.move_on_at(start + limits.DHT_STREAM_TIMEOUT_S) as answering:
                await self.dht._do_handle_stream(_OneRequestStream(stream, _varint(len(request)) + request))
            if answering.cancelled_caught:
                self.timed_out += 1
                await self._reset(stream)
        finally:
            limits.current_peer.reset(token)
        return True

    async def _prevalidate(self, msg: Any) -> bool:
        """Run the value's validator in a worker thread (a manifest takes 1-90 ms to verify), so
        py-libp2p's own synchronous validate call finds it already checked (see
        kvnet.p2p.dht.ManifestValidator)."""
        try:
            key = msg.record.key.decode("utf-8")
        except UnicodeDecodeError:
            return False
        value = bytes(msg.record.value)
        validator = self.dht.validator
        try:
            await trio.to_thread.run_sync(validator.validate, key, value, limiter=self.validations)
        except Exception as exc:  # noqa: BLE001 - any validator error refuses the record
            log.debug("DHT value refused: %r", exc)
            return False
        return True


def discard_unread(stream: Any) -> int:
    """Drop what a stream we are about to reset has buffered but nobody will read; return the bytes.

    Why: py-libp2p 0.8.1's yamux keeps a fully closed stream, buffer included, for 60 s
    (`_STALE_STREAM_GRACE_SECONDS`) when its receive buffer is not empty, and a reset does not empty
    it. 150 refused 900 KB PUT_VALUE requests thus held +68 MB for a minute (measured). With the
    buffer emptied first, `reset` -> `_finalize_stream(fully_closed=True)` drops the entry at once.
    Relies on (0.8.1): `NetStream.muxed_stream`, `YamuxStream.conn` and `.stream_id`,
    `Yamux.stream_buffers` (stream id -> bytearray).
    """
    muxed = getattr(stream, "muxed_stream", None)
    buffers = getattr(getattr(muxed, "conn", None), "stream_buffers", None)
    if not isinstance(buffers, dict):
        return 0
    buffer = buffers.get(getattr(muxed, "stream_id", None))
    if not buffer:
        return 0
    size = len(buffer)
    buffer.clear()
    return size


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def guard_dht_handler(dht: Any) -> DhtGuard:
    """Serve `dht`'s protocol through a `DhtGuard` instead of py-libp2p's `KadDHT.handle_stream`.

    Why: py-libp2p 0.8.1 runs at most 12 DHT handlers at once (`_inbound_limiter`), resets the rest,
    and has no read deadline; each handler reads requests in a loop until EOF. So any 12 streams
    that were idle, truncated, dripping, not reading their answers or pipelining denied the DHT to
    everyone, and unknown message types, PING and malformed varints left streams open. The guard:
    DHT_REQUEST_TIMEOUT_S for the whole request, DHT_STREAM_TIMEOUT_S for the stream, exactly one
    request per stream (then close), reset on any unknown type, PING, malformed varint or rule of
    kvnet.p2p.dht_limits.check_request, DHT_STREAMS_PER_PEER per peer and DHT_HANDLERS_MAX in all.
    Relies on (0.8.1): `KadDHT._do_handle_stream(stream)` (the handler body without the limiter),
    reading with `read_varint_prefixed_bytes_limited` and treating EOF before a length as a clean
    end; `host.set_stream_handler` replacing the handler `KadDHT.__init__` registered.
    """
    guard = DhtGuard(dht)
    dht.host.set_stream_handler(_kad.PROTOCOL_ID, guard.handle)
    dht.kvnet_guard = guard
    return guard


def install_dht_stores(dht: Any, provider_store: Any, value_store: Any) -> None:
    """Replace a KadDHT's provider and value stores (kvnet.p2p.dht_limits' bounded ones).

    Relies on (0.8.1): `KadDHT.provider_store` and `.value_store` being plain attributes that the
    handler and the client paths read on every use (nothing else keeps a reference to them).
    """
    dht.provider_store = provider_store
    dht.value_store = value_store


# -- 6. provider lookups: the closer peers of a GET_PROVIDERS answer ------------------------------


async def providers_and_closers_from_peer(dht: Any, peer: Any, key: bytes) -> tuple[list[Any], list[Any]]:
    """Ask one peer (GET_PROVIDERS) for `key`: (provider PeerInfos, closer peer IDs).

    Why: a provider lookup that only asks the peers `find_closest_peers_network` returned can be
    eclipsed: Sybil peers closest to the key answer with themselves, and the peers holding the real
    provider record are never asked. kvnet's lookup (`kvnet.p2p.dht.lookup_providers`) walks on
    through the closer peers each answer names, which py-libp2p's own lookup throws away.
    Relies on (0.8.1): `ProviderStore._get_providers_from_peer_with_closers(peer, key)` returning
    `(providers, closer_peer_ids)`, and ([], []) for a peer that fails (it swallows the error),
    which is why the lookup never counts an empty answer as proof of anything.
    """
    providers, closer = await dht.provider_store._get_providers_from_peer_with_closers(peer, key)
    return list(providers), list(closer)
