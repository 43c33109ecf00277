"""Pins for every patch in kvnet/p2p/compat.py: each test fails when the py-libp2p code a patch relies
on changes shape, so an upgrade cannot silently turn a patch into a no-op (or into a bug)."""

from __future__ import annotations

import contextlib
import errno
import inspect
import socket
from importlib.metadata import version

import libp2p.stream_muxer.muxer_multistream as muxer_multistream
import libp2p.stream_muxer.yamux.yamux as yamux
import libp2p.transport.tcp.tcp as tcp
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.network.swarm import Swarm
from libp2p.peer.peerinfo import PeerInfo

from kvnet.p2p import compat
from kvnet.p2p.host import make_host, parse_addrs, running


def test_upstream_version_is_the_one_the_patches_target():
    assert version("libp2p") == compat.UPSTREAM_VERSION, "re-check every patch in kvnet/p2p/compat.py"


# -- yamux window grant ------------------------------------------------------------------------


def test_yamux_keeps_the_spec_initial_window():
    """Nobody may raise the module constant again: it is also the credit a sender assumes."""
    assert yamux.DEFAULT_WINDOW_SIZE == compat.YAMUX_SPEC_WINDOW == 256 * 1024
    stream = yamux.YamuxStream(1, object(), True)  # the attributes grant_receive_window relies on
    assert stream.send_window == stream.recv_window == stream.target_recv_window == 256 * 1024
    assert isinstance(stream.window_lock, trio.Lock) and not stream.closed and not stream.reset_received
    assert "increment" in inspect.signature(yamux.YamuxStream.send_window_update).parameters


def test_yamux_sender_spends_only_its_send_window():
    """GrantingYamux leaves sending to upstream; this is the upstream rule that makes that correct."""
    src = inspect.getsource(yamux.YamuxStream.write)
    assert "if self.send_window > 0:" in src and "self.send_window -= to_send" in src
    assert "self.send_window," in src.split("to_send = min(")[1].split(")")[0]


def test_muxer_negotiation_builds_the_granting_yamux():
    """py-libp2p ignores muxer_opt's class for yamux and calls the module global `Yamux`."""
    src = inspect.getsource(muxer_multistream.MuxerMultistream.new_conn)
    assert "yamux_conn = Yamux(" in src
    assert muxer_multistream.Yamux is compat.GrantingYamux
    assert issubclass(compat.GrantingYamux, yamux.Yamux)


@pytest.mark.trio
async def test_kvnet_peers_grant_each_other_the_larger_window():
    a, b = make_host(Ed25519PrivateKey.generate()), make_host(Ed25519PrivateKey.generate())
    seen: dict[str, int] = {}

    async def handler(stream):
        seen["server_send_window"] = stream.muxed_stream.send_window  # before it sent anything
        seen["server_recv_window"] = stream.muxed_stream.recv_window
        await stream.read(1)
        await stream.close()

    async with running(a, ["/ip4/127.0.0.1/tcp/0"]), running(b, ["/ip4/127.0.0.1/tcp/0"]):
        a.set_stream_handler("/kvnet/test/1", handler)
        await b.connect(PeerInfo(a.get_id(), a.get_addrs()))
        stream = await b.new_stream(a.get_id(), ["/kvnet/test/1"])
        assert type(stream.muxed_conn) is compat.GrantingYamux
        assert stream.muxed_stream.target_recv_window >= compat.YAMUX_RECEIVE_WINDOW
        await stream.write(b"x")
        with trio.fail_after(10):
            while "server_send_window" not in seen:
                await trio.sleep(0.01)
        await stream.close()
    # the opener's grant reached the acceptor before the request did, and the acceptor granted too
    assert seen["server_send_window"] >= compat.YAMUX_RECEIVE_WINDOW
    assert seen["server_recv_window"] >= compat.YAMUX_RECEIVE_WINDOW


def test_yamux_writes_a_frame_under_one_lock_in_the_callers_task():
    """GrantingYamux._write_frame replaces upstream's: the same lock and the same one write call."""
    src = inspect.getsource(yamux.Yamux._write_frame)
    assert "async with self._write_lock:" in src and "await self.secured_conn.write(data)" in src
    assert src.count("secured_conn.write") == 1
    assert "_write_frame" in compat.GrantingYamux.__dict__


@pytest.mark.trio
async def test_a_write_cancelled_halfway_leaves_the_connection_usable():
    """Writes of 1 MiB cancelled after 0, 1, 2, ... scheduling points: some stop in the middle of
    a frame. Upstream then leaves half a Noise message on the wire and the next stream to that peer
    fails ("handshake write failed"); with the whole-frame write every later stream works."""
    a, b = make_host(Ed25519PrivateKey.generate()), make_host(Ed25519PrivateKey.generate())

    async def echo(stream):
        with contextlib.suppress(Exception):
            while data := await stream.read(1 << 16):
                if data.startswith(b"ping"):
                    await stream.write(data)
            await stream.close()

    async def cancel_after(scope: trio.CancelScope, k: int) -> None:
        for _ in range(k):
            await trio.lowlevel.checkpoint()
        scope.cancel()

    async with running(a, ["/ip4/127.0.0.1/tcp/0"]), running(b, ["/ip4/127.0.0.1/tcp/0"]):
        a.set_stream_handler("/kvnet/test/1", echo)
        await b.connect(PeerInfo(a.get_id(), a.get_addrs()))
        payload = bytes(1 << 20)
        for k in range(60):
            async with trio.open_nursery() as n:
                with trio.CancelScope() as scope:
                    n.start_soon(cancel_after, scope, k)
                    stream = await b.new_stream(a.get_id(), ["/kvnet/test/1"])
                    await stream.write(payload)
                scope.cancel()
        with trio.fail_after(10):
            stream = await b.new_stream(a.get_id(), ["/kvnet/test/1"])
            await stream.write(b"ping")
            assert await stream.read(4) == b"ping"
            await stream.close()


# -- exclusive TCP listen ----------------------------------------------------------------------


def test_tcp_listener_still_calls_the_patched_function():
    assert "_open_reuseport_listeners(host, port)" in inspect.getsource(tcp.TCPListener.listen)
    assert tcp._open_reuseport_listeners is compat.open_exclusive_listeners
    assert list(inspect.signature(compat._UPSTREAM_OPEN_LISTENERS).parameters) == ["host", "port"]


def test_upstream_still_listens_with_so_reuseport():
    """Why the patch exists; if upstream stops setting SO_REUSEPORT on listeners, drop the patch."""
    assert "SO_REUSEPORT" in inspect.getsource(tcp._set_reuse_flags)
    assert "_set_reuse_flags(sock)" in inspect.getsource(compat._UPSTREAM_OPEN_LISTENERS)


def test_swarm_records_listeners_by_address():
    """kvnet.p2p.host.running detects a failed listen by its absence from `Swarm.listeners`."""
    src = inspect.getsource(Swarm.listen)
    assert "self.listeners[str(maddr)] = listener" in src and "self.listeners.pop(str(maddr), None)" in src


@pytest.mark.trio
async def test_upstream_host_run_still_leaves_its_listener_open():
    """Why compat.close_listeners exists: a host stopped by leaving `host.run` keeps its port. If this
    starts failing, upstream closes its listeners itself and the workaround can go."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = make_host(Ed25519PrivateKey.generate())
    async with host.run(listen_addrs=parse_addrs([f"/ip4/127.0.0.1/tcp/{port}"])):
        network = host.get_network()
    with socket.socket() as probe, pytest.raises(OSError) as err:
        probe.bind(("127.0.0.1", port))
    assert err.value.errno == errno.EADDRINUSE
    await compat.close_listeners(network)  # and the workaround frees it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


# -- Kademlia ------------------------------------------------------------------------------------


def test_every_dht_module_copy_of_the_protocol_id_is_kvnets():
    """use_dht_protocol replaced every module-level copy, and no other kad_dht module holds one."""
    import pkgutil

    import libp2p.kad_dht as kad_pkg

    from kvnet.p2p.dht import DHT_PROTOCOL

    holders = []
    for info in pkgutil.iter_modules(kad_pkg.__path__):
        module = __import__(f"libp2p.kad_dht.{info.name}", fromlist=["_"])
        if "PROTOCOL_ID" in vars(module):
            holders.append(module)
    assert set(holders) == set(compat.DHT_MODULES_WITH_PROTOCOL_ID)
    assert all(m.PROTOCOL_ID == DHT_PROTOCOL for m in holders)


def test_provider_store_keeps_a_set_of_provided_keys_and_the_private_lookup():
    from libp2p.kad_dht.provider_store import ProviderStore

    assert "providing_keys" in inspect.getsource(ProviderStore.__init__)
    params = list(inspect.signature(ProviderStore._get_providers_from_peer_with_closers).parameters)
    assert params[1:3] == ["peer_id", "key"]


def test_kad_dht_rate_limit_attributes_exist_and_are_raised():
    from libp2p.kad_dht.kad_dht import KadDHT

    from kvnet.p2p.dht import PROVIDER_RATE_MAX, make_dht

    src = inspect.getsource(KadDHT._check_provider_rate_limit)
    assert "self._provider_rate_max" in src and "self._provider_rate_window" in src
    dht = make_dht(make_host(Ed25519PrivateKey.generate()))
    assert dht._provider_rate_max == PROVIDER_RATE_MAX
    assert compat.provider_rate_window(dht) == 10.0


def test_provide_pacer_holds_starts_to_its_limit_per_window():
    from kvnet.p2p.dht import ProvidePacer

    async def main() -> list[float]:
        pacer = ProvidePacer(limit=3, window=5.0)
        starts = []
        for _ in range(7):
            await pacer.wait()
            starts.append(trio.current_time())
        return starts

    clock = trio.testing.MockClock(autojump_threshold=0)
    starts = trio.run(main, clock=clock)
    for i in range(len(starts)):
        in_window = [t for t in starts if starts[i] <= t < starts[i] + 5.0]
        assert len(in_window) <= 3
    assert starts[-1] - starts[0] >= 10.0  # 7 starts at 3 per 5 s need at least two waits
