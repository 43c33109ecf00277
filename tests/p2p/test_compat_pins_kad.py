"""Pins for compat section 5 (the Kademlia server guard) and the bounded stores of kvnet.p2p.dht_limits:
each fails when the py-libp2p 0.8.1 code they rely on changes shape, or when the upstream weakness
they work around is gone (then the workaround can go)."""

from __future__ import annotations

import inspect

import libp2p.kad_dht.common as kad_common
import libp2p.stream_muxer.yamux.yamux as yamux
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from kvnet.p2p import compat, dht_limits
from kvnet.p2p.dht import DHT_PROTOCOL, make_dht
from kvnet.p2p.host import make_host


def test_upstream_handler_is_what_the_guard_wraps():
    """The guard calls `_do_handle_stream` itself, with a stream that ends after one request."""
    src = inspect.getsource(KadDHT._do_handle_stream)
    assert "while True:" in src  # why: upstream reads request after request on one stream
    assert "read_varint_prefixed_bytes_limited(" in src and "e.received_bytes == 0" in src  # EOF = clean end
    assert "stream.muxed_conn.peer_id" in src
    init = inspect.getsource(KadDHT.__init__)
    assert "trio.CapacityLimiter(12)" in init  # why: 12 handlers in all, no deadline
    assert "host.set_stream_handler(PROTOCOL_ID, self.handle_stream)" in init
    assert "borrowed_tokens >= self._inbound_limiter.total_tokens" in inspect.getsource(KadDHT.handle_stream)


def test_upstream_handler_stores_through_the_replaced_stores():
    src = inspect.getsource(KadDHT._do_handle_stream)
    assert "self.provider_store.add_provider(key, provider_info)" in src
    assert "self.value_store.put_record(key, cleaned_record)" in src
    assert "self.validator.validate(key_str, value)" in src
    assert "self.provider_store.get_providers(key)" in src
    assert list(inspect.signature(ProviderRecord).parameters) == ["provider_info", "timestamp"]
    assert list(inspect.signature(ValueStore.put_record).parameters) == ["self", "key", "record"]
    assert "self.store[key] = (record, validity)" in inspect.getsource(ValueStore.put_record)


def test_upstream_provider_store_keeps_every_address():
    """Why BoundedProviderStore exists: upstream keeps all of a provider's addresses."""
    host = make_host(Ed25519PrivateKey.generate())
    store = ProviderStore(host)
    addrs = [Multiaddr(f"/ip4/10.0.{i // 256}.{i % 256}/tcp/1") for i in range(100)]
    store.add_provider(b"k" * 32, PeerInfo(host.get_id(), addrs))
    store.add_provider(b"x", PeerInfo(host.get_id(), addrs))  # and any key length
    assert len(store.get_providers(b"k" * 32)[0].addrs) == 100 and store.get_providers(b"x")
    bounded = dht_limits.BoundedProviderStore(host)
    bounded.add_provider(b"k" * 32, PeerInfo(host.get_id(), addrs))
    bounded.add_provider(b"x", PeerInfo(host.get_id(), addrs))
    assert len(bounded.get_providers(b"k" * 32)[0].addrs) == dht_limits.PROVIDER_ADDRS_MAX
    assert not bounded.get_providers(b"x")


def test_yamux_keeps_reset_streams_with_unread_data():
    """Why compat.discard_unread exists: a fully closed stream with buffered data stays 60 s."""
    assert yamux._STALE_STREAM_GRACE_SECONDS == 60.0
    src = inspect.getsource(yamux.Yamux._finalize_stream_locked)
    assert "if not self.stream_buffers.get(sid):" in src and "self.streams.pop(sid, None)" in src
    assert "await self.conn._finalize_stream(self, fully_closed=True)" in inspect.getsource(yamux.YamuxStream.reset)


def test_make_dht_installs_the_guard_and_the_bounded_stores():
    host = make_host(Ed25519PrivateKey.generate())
    dht = make_dht(host)
    assert isinstance(dht.provider_store, dht_limits.BoundedProviderStore)
    assert isinstance(dht.value_store, dht_limits.BoundedValueStore)
    assert dht.provider_store.peer_routing is dht.peer_routing
    assert isinstance(dht.kvnet_guard, compat.DhtGuard)
    handler = host.get_mux().handlers[DHT_PROTOCOL]
    assert getattr(handler, "__func__", None) is compat.DhtGuard.handle and handler.__self__ is dht.kvnet_guard


def test_limits_fit_under_upstream_limits():
    assert dht_limits.PUT_VALUE_MAX_BYTES < kad_common.MAX_DHT_MESSAGE_SIZE
    assert dht_limits.MANIFEST_RECORD_MAX_BYTES < kad_common.MAX_RECORD_SIZE
    assert dht_limits.DHT_REQUEST_TIMEOUT_S < dht_limits.DHT_STREAM_TIMEOUT_S
    assert dht_limits.DHT_STREAMS_PER_PEER * 4 <= dht_limits.DHT_HANDLERS_MAX
    # a full GET_PROVIDERS answer (every provider with every address) stays far under 4 MiB
    answer = dht_limits.PROVIDERS_PER_KEY * (dht_limits.PROVIDER_ADDRS_MAX * dht_limits.PROVIDER_ADDR_MAX_BYTES
                                             + dht_limits.DHT_REQUEST_MAX_BYTES)
    assert answer < kad_common.MAX_DHT_MESSAGE_SIZE // 4
