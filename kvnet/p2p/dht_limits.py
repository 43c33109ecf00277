"""Server-side DHT policy: what a kvnet node accepts from strangers on `/kvnet/kad/1.0.0`.

Every limit is a named constant below (docs/security.md, "The DHT", lists them with their
defaults). py-libp2p 0.8.1 has none of these: it runs at most 12 handlers with no read deadline, keeps
provider entries with any number of addresses for keys of 1..80 bytes, and keeps up to 50,000 values
of up to 1 MiB each (issue 7). The handler guard that applies the request rules is
`kvnet.p2p.compat.guard_dht_handler` (compat section 5); the stores here replace py-libp2p's in
`kvnet.p2p.dht.make_dht`.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import OrderedDict
from typing import Any

from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.peerinfo import PeerInfo

from kvnet.errors import KvnetError

log = logging.getLogger("kvnet.p2p.dht_limits")

# -- streams and requests ---------------------------------------------------------------------------

DHT_REQUEST_TIMEOUT_S = 5.0
"""Seconds from a DHT stream's arrival until its whole request (varint length and body) has been
read. A stream idle, truncated or dripping past it is reset (upstream: no deadline at all)."""

DHT_STREAM_TIMEOUT_S = 10.0
"""Seconds a DHT stream may live in total, answer included: a peer that does not read its answer
is reset after this."""

DHT_HANDLERS_MAX = 128
"""DHT requests handled at once by one node, all peers together (upstream: 12, so 12 stalled
streams denied the DHT to everyone)."""

DHT_STREAMS_PER_PEER = 16
"""DHT requests of one peer handled at once. An honest kvnet node sends at most about 8 at once to
one peer (8 provider records in flight, or 4 parallel prefix probes); more wait for a slot."""

DHT_QUEUED_PER_PEER = 32
"""DHT streams of one peer waiting for a slot (within DHT_REQUEST_TIMEOUT_S); more are reset."""

DHT_STREAMS_PER_IP = 32
"""DHT requests handled at once from one IP address (IPv6: one /64), all its peer ids together: a
quarter of DHT_HANDLERS_MAX, so one address with many free identities cannot take every slot; more
wait for a slot within DHT_REQUEST_TIMEOUT_S. Loopback is exempt by default (the host's
ConnectionLimits.exempt, which also sets this value as ConnectionLimits.dht_per_ip)."""

DHT_REQUEST_MAX_BYTES = 16 * 1024
"""Largest FIND_NODE, GET_PROVIDERS, ADD_PROVIDER or GET_VALUE request (an honest one is under
2 KiB: a key, a signed peer record, one provider with its addresses)."""

DHT_ALLOWED_TYPES = frozenset({
    Message.MessageType.PUT_VALUE, Message.MessageType.GET_VALUE, Message.MessageType.ADD_PROVIDER,
    Message.MessageType.GET_PROVIDERS, Message.MessageType.FIND_NODE,
})
"""Request types a kvnet node answers. PING is not among them (the Kademlia spec says peers must
not send it and nothing in kvnet or py-libp2p does); unknown types are reset too."""

PROVIDER_KEY_BYTES = 32
"""Provider keys are manifest ids and chain keys: exactly 32 bytes (docs/discovery.md)."""

MANIFEST_KEY_BYTES = 48
"""A value key is `/kvm/` + unpadded base64url of a 32-byte manifest id: 48 bytes."""

# -- provider records -------------------------------------------------------------------------------

PROVIDER_ADDRS_MAX = 8
"""Addresses kept per provider entry (the first ones that fit PROVIDER_ADDR_MAX_BYTES)."""

PROVIDER_ADDR_MAX_BYTES = 128
"""Largest address kept in a provider entry, in its binary multiaddr form."""

PROVIDERS_PER_KEY = 32
"""Provider entries kept per key; a new provider evicts the one refreshed longest ago."""

PROVIDER_KEYS_PER_PEER = 2048
"""Keys one providing peer may have entries for on this node (a node holding 128 artifacts of
4096 blocks announces 14 keys each: 1,792); a new one evicts that peer's oldest entry."""

PROVIDER_ENTRIES_MAX = 32768
"""Provider entries kept in total; a new one evicts the oldest entry of any peer."""

# -- values (manifest records) ----------------------------------------------------------------------

MANIFEST_RECORD_MAX_BYTES = 192 * 1024
"""Largest manifest stored as a DHT value. Derived from what a real manifest needs: 32 B per piece
hash and per chain key plus about 2 B of msgpack each; Qwen3-4B's full native context (32,768
tokens x 147,456 B/token = 4,608 pieces of 1 MiB, 128 chain keys) is a 163 KB manifest (measured).
A larger manifest is still obtained from any provider's offer (docs/discovery.md)."""

PUT_VALUE_MAX_BYTES = MANIFEST_RECORD_MAX_BYTES + DHT_REQUEST_MAX_BYTES
"""Largest PUT_VALUE request: one manifest record plus the envelope around it."""

VALUE_RECORDS_MAX = 1024
"""Values kept in total (upstream: 50,000); the oldest is evicted."""

VALUE_BYTES_MAX = 32 * 1024 * 1024
"""Bytes of values kept in total; the oldest are evicted."""

VALUE_BYTES_PER_PEER = 2 * 1024 * 1024
"""Bytes of values kept from one storing peer; its oldest are evicted."""

VALUE_VALIDATIONS_AT_ONCE = 2
"""Manifest validations run at once in worker threads (a 163 KB manifest takes about 18 ms to parse
and verify, a 900 KB one 88 ms: too long for the event loop)."""

current_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvnet_dht_peer", default=None)
"""The remote peer whose DHT request the current task is handling (set by the handler guard), so
the stores can account what they keep to the peer that sent it."""


class RequestRefused(KvnetError, ValueError):
    """A DHT request breaks a rule above: the stream is reset without an answer."""


def check_request(msg: Message, size: int) -> Message:
    """Apply the request rules to a parsed request; return it (ADD_PROVIDER trimmed) or raise
    RequestRefused. What is refused here never reaches py-libp2p's handler."""
    if msg.type not in DHT_ALLOWED_TYPES:
        raise RequestRefused(f"message type {msg.type} not answered")
    if msg.type == Message.MessageType.PUT_VALUE:
        if size > PUT_VALUE_MAX_BYTES:
            raise RequestRefused(f"PUT_VALUE of {size} bytes")
        key = msg.record.key if msg.HasField("record") else msg.key
        if len(key) != MANIFEST_KEY_BYTES or len(msg.record.value) > MANIFEST_RECORD_MAX_BYTES:
            raise RequestRefused("PUT_VALUE key or value size")
        return msg
    if size > DHT_REQUEST_MAX_BYTES:
        raise RequestRefused(f"request of {size} bytes")
    providers = msg.type in (Message.MessageType.ADD_PROVIDER, Message.MessageType.GET_PROVIDERS)
    if providers and len(msg.key) != PROVIDER_KEY_BYTES:
        raise RequestRefused(f"provider key of {len(msg.key)} bytes")
    if msg.type == Message.MessageType.GET_VALUE and len(msg.key) != MANIFEST_KEY_BYTES:
        raise RequestRefused(f"value key of {len(msg.key)} bytes")
    if msg.type == Message.MessageType.ADD_PROVIDER:
        for provider in msg.providerPeers:
            keep = [a for a in provider.addrs if len(a) <= PROVIDER_ADDR_MAX_BYTES][:PROVIDER_ADDRS_MAX]
            if len(keep) != len(provider.addrs):
                del provider.addrs[:]
                provider.addrs.extend(keep)
    return msg


def trim_addrs(addrs: list[Any]) -> list[Any]:
    """The first PROVIDER_ADDRS_MAX addresses of at most PROVIDER_ADDR_MAX_BYTES each."""
    return [a for a in addrs if len(a.to_bytes()) <= PROVIDER_ADDR_MAX_BYTES][:PROVIDER_ADDRS_MAX]


class BoundedProviderStore(ProviderStore):
    """py-libp2p's provider store with kvnet's bounds: 32-byte keys only, trimmed addresses, and
    caps per key, per providing peer and in total, each evicting the entry refreshed longest ago.

    Why: upstream keeps every address of up to 20 providers per key with no other bound, so two
    identities sending 400k addresses each made a manifest's GET_PROVIDERS answer 8 MB, which every
    py-libp2p client refuses (> 4 MiB): the manifest was unfindable through that node for 48 h.
    Relies on (0.8.1): `ProviderStore.providers` (key -> {peer id string -> ProviderRecord}) and
    `add_provider(key, PeerInfo)` being the only way entries are added.
    """

    def __init__(self, host: Any, peer_routing: Any = None) -> None:
        super().__init__(host=host, peer_routing=peer_routing)
        self._order: OrderedDict[tuple[bytes, str], None] = OrderedDict()  # oldest refresh first
        self._by_peer: dict[str, OrderedDict[bytes, None]] = {}
        self.evicted = 0

    def _drop(self, key: bytes, peer: str) -> None:
        self._order.pop((key, peer), None)
        keys = self._by_peer.get(peer)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_peer[peer]
        entries = self.providers.get(key)
        if entries is not None and entries.pop(peer, None) is not None:
            self.evicted += 1
            if not entries:
                del self.providers[key]

    def _live(self, key: bytes, peer: str) -> bool:
        return peer in self.providers.get(key, {})

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        if not provider or not provider.peer_id or len(key) != PROVIDER_KEY_BYTES:
            return
        addrs = trim_addrs(list(provider.addrs))
        if not addrs:
            return
        peer = str(provider.peer_id)
        entries = self.providers.get(key, {})
        if peer not in entries and len(entries) >= PROVIDERS_PER_KEY:
            oldest = min(entries.items(), key=lambda kv: kv[1].timestamp)[0]
            self._drop(key, oldest)
        keys = self._by_peer.get(peer, OrderedDict())
        while key not in keys and len(keys) >= PROVIDER_KEYS_PER_PEER:
            self._drop(next(iter(keys)), peer)
        while (key, peer) not in self._order and len(self._order) >= PROVIDER_ENTRIES_MAX:
            old_key, old_peer = next(iter(self._order))
            self._drop(old_key, old_peer)
        # upstream's own add (with its 20-per-key rule lifted: our cap above replaces it)
        self.providers.setdefault(key, {})
        self.providers[key][peer] = ProviderRecord(PeerInfo(provider.peer_id, addrs), time.time())
        self._order.pop((key, peer), None)
        self._order[(key, peer)] = None
        self._by_peer.setdefault(peer, OrderedDict()).pop(key, None)
        self._by_peer[peer][key] = None
        # entries upstream expired on read leave stale index rows: prune a few from the oldest end
        for _ in range(4):
            if not self._order:
                break
            k, p = next(iter(self._order))
            if self._live(k, p):
                break
            self._drop(k, p)

    def entries(self) -> int:
        """Provider entries held now."""
        return sum(len(v) for v in self.providers.values())


class BoundedValueStore(ValueStore):
    """py-libp2p's value store with kvnet's bounds: records and bytes in total and bytes per storing
    peer, each evicting the oldest record.

    Why: upstream's only bound is 50,000 records of up to 1 MiB each (50 GB): 150 valid,
    attacker-signed 922 KB manifests grew a node's RSS by 181 MB. Relies on (0.8.1):
    `ValueStore.store` (key -> (Record, validity)), `put_record(key, record)` for records received
    over the wire and `put(key, value)` for the node's own.
    """

    def __init__(self, host: Any, local_peer_id: Any) -> None:
        super().__init__(host=host, local_peer_id=local_peer_id)
        self._owner: OrderedDict[bytes, tuple[str, int]] = OrderedDict()  # key -> (peer, bytes), oldest first
        self._peer_bytes: dict[str, int] = {}
        self.total_bytes = 0
        self.evicted = 0

    def _forget(self, key: bytes) -> None:
        owner = self._owner.pop(key, None)
        if owner is None:
            return
        peer, size = owner
        self.total_bytes -= size
        left = self._peer_bytes.get(peer, 0) - size
        if left > 0:
            self._peer_bytes[peer] = left
        else:
            self._peer_bytes.pop(peer, None)

    def _evict(self, key: bytes) -> None:
        self._forget(key)
        if self.store.pop(key, None) is not None:
            self.evicted += 1

    def _account(self, key: bytes, size: int, peer: str) -> None:
        self._forget(key)
        for k in [k for k in self._owner if k not in self.store]:  # removed by upstream (expiry)
            self._forget(k)
        mine = [k for k, (p, _) in self._owner.items() if p == peer]
        while mine and self._peer_bytes.get(peer, 0) + size > VALUE_BYTES_PER_PEER:
            self._evict(mine.pop(0))
        while self._owner and (self.total_bytes + size > VALUE_BYTES_MAX
                               or len(self._owner) + 1 > VALUE_RECORDS_MAX):
            self._evict(next(iter(self._owner)))
        self._owner[key] = (peer, size)
        self._peer_bytes[peer] = self._peer_bytes.get(peer, 0) + size
        self.total_bytes += size

    def put_record(self, key: bytes, record: Any) -> None:
        peer = current_peer.get() or "?"
        size = len(record.value)
        if size > MANIFEST_RECORD_MAX_BYTES or size > VALUE_BYTES_PER_PEER:
            log.debug("value for %r refused: %d bytes", key[:16], size)
            return
        self._account(key, size, peer)
        super().put_record(key, record)

    def put(self, key: bytes, value: bytes, validity: float = 0.0) -> None:
        self._account(key, len(value), str(self.local_peer_id))
        super().put(key, value, validity)

    def remove(self, key: bytes) -> bool:
        self._forget(key)
        return super().remove(key)
