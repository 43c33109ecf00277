"""Pins for kvnet/p2p/compat.py section 4 (swarm): each fails when the py-libp2p code a patch relies on
changes shape, so an upgrade cannot silently turn a patch into a no-op (or into a bug)."""

from __future__ import annotations

import hashlib
import inspect
import textwrap

import libp2p.network.auto_connector as auto_connector
import libp2p.network.connection.swarm_connection as swarm_connection
import libp2p.network.swarm as swarm_module
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.peer.peerinfo import PeerInfo

from kvnet.p2p import compat
from kvnet.p2p.host import MAX_CONNECTIONS, MAX_INBOUND_CONNECTIONS, make_host, running

# sha256 of upstream 0.8.1's `Swarm._do_handle_inbound_connection` source (dedented). compat's
# replacement is a copy of it with one line changed: re-check the copy when this changes.
UPSTREAM_DO_HANDLE_INBOUND_SHA256 = "08c2d84feaa0d80c0dc3c20c2450bb553941ad72021417ea5ea2430d8a48a4fd"


def _source_hash(fn) -> str:
    return hashlib.sha256(textwrap.dedent(inspect.getsource(fn)).encode()).hexdigest()


def test_the_inbound_handler_copy_matches_upstream_0_8_1():
    """compat.handle_inbound_until_closed copies upstream's body; only the final barrier differs."""
    upstream = compat._UPSTREAM_DO_HANDLE_INBOUND
    src = inspect.getsource(upstream)
    assert _source_hash(upstream) == UPSTREAM_DO_HANDLE_INBOUND_SHA256, "upstream changed: re-check the copy"
    # the leak: both paths end in a barrier that lasts until the whole swarm stops
    assert src.count("await self.manager.wait_finished()") == 2
    assert "muxed_conn = cast(IMuxedConn, read_write_closer)" in src
    assert "await self.upgrade_inbound_raw_conn(raw_conn, maddr)" in src
    for name in ("RawConnection", "IMuxedConn", "cast", "logger"):
        assert hasattr(swarm_module, name), name


def test_the_inbound_slot_is_held_for_exactly_the_inner_handler():
    """The slot is a token of `_inbound_limiter`, taken before and given back after the inner handler."""
    src = inspect.getsource(swarm_module.Swarm._handle_inbound_connection)
    assert "self._inbound_limiter.acquire_nowait()" in src
    after_acquire = src.split("self._inbound_limiter.acquire_nowait()")[1]
    assert "await self._do_handle_inbound_connection(" in after_acquire
    assert "finally:\n            self._inbound_limiter.release()" in after_acquire
    assert swarm_module.Swarm._do_handle_inbound_connection is compat.handle_inbound_until_closed
    src = inspect.getsource(swarm_module.Swarm.upgrade_inbound_raw_conn)
    assert "return muxed_conn" in src


def test_yamux_signals_its_close_with_event_closed():
    """wait_connection_closed waits on `Yamux.event_closed`, set by close() and by the error cleanup."""
    from libp2p.stream_muxer.yamux import yamux

    assert "self.event_closed.set()" in inspect.getsource(yamux.Yamux.close)
    assert "self.event_closed.set()" in inspect.getsource(yamux.Yamux._cleanup_on_error)


def test_stream_cap_wraps_the_per_stream_handler():
    src = inspect.getsource(swarm_connection.SwarmConn._handle_new_streams)
    assert "nursery.start_soon(self._handle_muxed_stream, stream)" in src
    assert "await self.swarm.common_stream_handler(net_stream)" in inspect.getsource(
        compat._UPSTREAM_HANDLE_MUXED_STREAM)
    assert swarm_connection.SwarmConn._handle_muxed_stream is compat.handle_stream_capped


def test_the_auto_connector_is_off_only_while_start_is_skipped():
    assert "self._started = True" in inspect.getsource(auto_connector.AutoConnector.start)
    for fn in (auto_connector.AutoConnector.run_background_task, auto_connector.AutoConnector.maybe_connect):
        assert "if not self._started:\n            return" in inspect.getsource(fn), fn.__name__
    assert "await self.auto_connector.start()" in inspect.getsource(swarm_module.Swarm.run)


@pytest.mark.trio
async def test_a_kvnet_host_frees_inbound_slots_caps_streams_and_never_auto_dials():
    """Behaviour of all three patches on real hosts: a closed inbound connection gives its slot back;
    the stream over the cap is reset while the others are served; the auto-connector never started."""
    server = make_host(Ed25519PrivateKey.generate(), max_streams_per_connection=2)
    swarm = server.get_network()
    assert compat.inbound_slots_total(swarm) == MAX_INBOUND_CONNECTIONS
    assert swarm.connection_config.max_connections == MAX_CONNECTIONS
    release = trio.Event()
    served = 0

    async def handler(stream) -> None:
        nonlocal served
        served += 1
        await release.wait()
        await stream.write(b"ok")
        await stream.close()

    async with running(server, ["/ip4/127.0.0.1/tcp/0"]):
        server.set_stream_handler("/kvnet/test/1", handler)
        assert swarm.auto_connector._started is False
        for _ in range(3):  # three clients in turn: each takes the slot and gives it back
            client = make_host(Ed25519PrivateKey.generate())
            async with running(client, ["/ip4/127.0.0.1/tcp/0"]):
                await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
                with trio.fail_after(10):
                    while compat.inbound_slots_in_use(swarm) != 1:
                        await trio.sleep(0.01)
                await client.disconnect(server.get_id())
            with trio.fail_after(10):
                while compat.inbound_slots_in_use(swarm) or swarm.get_connections():
                    await trio.sleep(0.05)

        client = make_host(Ed25519PrivateKey.generate())
        async with running(client, ["/ip4/127.0.0.1/tcp/0"]):
            await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
            streams = [await client.new_stream(server.get_id(), ["/kvnet/test/1"]) for _ in range(2)]
            with trio.fail_after(10):
                while served < 2:
                    await trio.sleep(0.01)
            with trio.fail_after(10), pytest.raises(Exception):  # noqa: B017 - reset: any stream error
                await client.new_stream(server.get_id(), ["/kvnet/test/1"])
            assert getattr(swarm.get_connections()[0], "_kvnet_refused_streams", 0) == 1
            assert served == 2
            release.set()
            for s in streams:
                with trio.fail_after(10):
                    assert await s.read(2) == b"ok"


# -- per-address limits, idle close, one inbound connection per peer (compat section 4) -------------


def test_inbound_connections_are_registered_inbound_and_know_their_remote_address():
    """The gate reads the accepted socket's remote (host, port); close_older_inbound tells inbound
    connections by `SwarmConn.direction`, which `upgrade_inbound_raw_conn` sets through add_conn."""
    from libp2p.io.trio import TrioTCPStream
    from libp2p.rcmgr import Direction

    src = inspect.getsource(TrioTCPStream.get_remote_address)
    # IPv6 getpeername() gives a 4-tuple, which upstream rejects (None): compat._remote_host then asks
    # the socket itself, at `TrioTCPStream.stream.socket`
    assert "len(remote_addr) != 2" in src and "socket = self.stream.socket" in src
    assert 'await self.add_conn(muxed_conn, direction="inbound")' in inspect.getsource(
        swarm_module.Swarm.upgrade_inbound_raw_conn)
    assert Direction.from_string("inbound") == Direction.INBOUND
    assert "Direction.from_string(str(direction))" in inspect.getsource(swarm_connection.SwarmConn.__init__)


def test_streams_of_a_connection_are_tracked_until_they_end():
    """close_when_idle looks at `SwarmConn.streams`: inbound ones leave it when their handler ends,
    outbound ones when closed or reset (NetStream.remove)."""
    from libp2p.network.stream.net_stream import NetStream

    assert "self.streams.add(net_stream)" in inspect.getsource(swarm_connection.SwarmConn._add_stream)
    assert "self.remove_stream(net_stream)" in inspect.getsource(compat._UPSTREAM_HANDLE_MUXED_STREAM)
    assert "self.swarm_conn.remove_stream(self)" in inspect.getsource(NetStream.remove)
    for fn in (NetStream.close, NetStream.reset):
        assert "await self.remove()" in inspect.getsource(fn), fn.__name__


def test_a_swarm_conn_close_unregisters_only_at_its_end():
    """Why compat shields the closes it starts: `SwarmConn.close` sets `event_closed` and closes the
    muxer (which ends the inbound handler's wait) before `_cleanup` removes it from the swarm, so a
    close cancelled in between leaves a closed connection registered."""
    src = inspect.getsource(swarm_connection.SwarmConn.close)
    assert src.index("self.event_closed.set()") < src.index("await self.muxed_conn.close()") < src.index(
        "await self._cleanup()")
    assert "self.swarm.remove_conn(self)" in inspect.getsource(swarm_connection.SwarmConn._cleanup)


def test_upstream_trims_extra_connections_only_after_a_grace_period():
    """What close_older_inbound replaces for inbound duplicates: upstream's trim skips connections
    younger than `grace_period` (20 s), so without it a peer could hold many connections for 20 s."""
    from libp2p.network.config import ConnectionConfig

    assert "(now - created_at) < grace_period" in inspect.getsource(swarm_module.Swarm._trim_connections)
    assert ConnectionConfig().grace_period == 20.0


def test_a_yamux_receive_window_grows_to_16_mib():
    """tests/p2p/test_attack_connections.py's slow reader needs an artifact larger than this, so the
    server's handler (and so the connection's open stream) waits on the reader."""
    from libp2p.stream_muxer.yamux import yamux

    assert yamux.MAX_WINDOW_SIZE == 16 * 1024 * 1024


# -- closed connections unregistered before a new stream (compat section 4) ------------------------


async def _stale_connection(client, server) -> object:
    """Leave `client` with a closed connection to `server` still registered: the end state of a close
    cut short between closing the muxer and unregistering (docs/upstream.md section 11)."""
    swarm = client.get_network()
    await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
    [conn] = swarm.get_connections(server.get_id())
    await client.disconnect(server.get_id())
    with trio.fail_after(10):
        while swarm.get_connections(server.get_id()):
            await trio.sleep(0.01)
    assert conn.is_closed
    swarm.connections[server.get_id()] = [conn]  # what the cut-short close leaves behind
    return conn


@pytest.mark.trio
async def test_a_closed_registered_connection_is_replaced_by_a_new_dial():
    """Upstream's new_stream fails for good on such a peer ("No valid connections"); once
    prune_closed_connections (what kvnet's Node._open calls first) unregistered the closed connection,
    new_stream dials and the stream works."""
    server, client = make_host(Ed25519PrivateKey.generate()), make_host(Ed25519PrivateKey.generate())

    async def echo(stream) -> None:
        await stream.write(await stream.read(2))
        await stream.close()

    async with running(server, ["/ip4/127.0.0.1/tcp/0"]), running(client, ["/ip4/127.0.0.1/tcp/0"]):
        server.set_stream_handler("/kvnet/test/1", echo)
        swarm = client.get_network()
        stale = await _stale_connection(client, server)
        with pytest.raises(swarm_module.SwarmException, match="No valid connections"):
            await client.new_stream(server.get_id(), ["/kvnet/test/1"])  # the bug, pinned
        assert compat.prune_closed_connections(swarm, server.get_id()) == 1
        with trio.fail_after(10):
            stream = await client.new_stream(server.get_id(), ["/kvnet/test/1"])
            await stream.write(b"hi")
            assert await stream.read(2) == b"hi"
        assert stale not in swarm.get_connections(server.get_id())
        assert all(not c.is_closed for c in swarm.get_connections(server.get_id()))
