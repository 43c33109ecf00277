"""The kvnet DHT: Kademlia on a private protocol id, validated records, provider records by prefix.

- Protocol `/kvnet/kad/1.0.0`, so kvnet never talks to (or trusts) the public IPFS DHT. py-libp2p
  copies its protocol id into several modules; `use_private_protocol` patches them all.
- Strict validation: only namespaced keys with a registered validator are accepted. The one value
  namespace is `/kvm/<base64url(manifest id)>` (48 bytes: py-libp2p drops lookup keys over 50 bytes),
  holding signed manifest bytes; a value is accepted only if BLAKE3(value) is the id in the key and
  the manifest parses, verifies and has not expired.
- Provider records are keyed by raw 32-byte ids: each manifest id and each of its chain keys.
- Prefix lookup: a provider of a document announces every chain key of it, so "some provider has
  boundary i" is monotone in i and the longest provided boundary of a prompt is found by trying the
  last boundary, then binary search: at most 1 + ceil(log2(blocks)) provider queries.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import libp2p.kad_dht.common as _common
import libp2p.kad_dht.kad_dht as _kad
import libp2p.kad_dht.peer_routing as _routing
import libp2p.kad_dht.provider_store as _providers
import libp2p.kad_dht.value_store as _values
import trio
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.records.validator import Validator

from kvnet import chain
from kvnet.hashing import b3
from kvnet.manifest import MAX_MANIFEST_BYTES, ManifestError, parse

DHT_PROTOCOL = "/kvnet/kad/1.0.0"
MANIFEST_NS = "kvm"
log = logging.getLogger("kvnet.p2p.dht")


def use_private_protocol() -> None:
    for module in (_common, _kad, _routing, _providers, _values):
        module.PROTOCOL_ID = DHT_PROTOCOL


use_private_protocol()


def manifest_key(mid: bytes) -> str:
    return f"/{MANIFEST_NS}/" + base64.urlsafe_b64encode(mid).rstrip(b"=").decode()


def _mid_from_key(key: str) -> bytes:
    prefix = f"/{MANIFEST_NS}/"
    if not key.startswith(prefix):
        raise ValueError(f"not a manifest key: {key!r}")
    text = key[len(prefix):]
    mid = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if len(mid) != 32:
        raise ValueError("manifest key must hold a 32-byte id")
    return mid


class ManifestValidator(Validator):
    """Accept a manifest record only if it is exactly the signed, unexpired manifest its key names."""

    def validate(self, key: str, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray) or len(value) > MAX_MANIFEST_BYTES:
            raise ValueError("manifest record too large or not bytes")
        if b3(value) != _mid_from_key(key):
            raise ValueError("manifest record does not hash to its key")
        try:
            parse(bytes(value))
        except ManifestError as exc:
            raise ValueError(f"manifest record rejected: {exc}") from exc

    def select(self, key: str, values: list[bytes]) -> int:
        return 0  # every valid value for a key is the same bytes (the key is their hash)


def make_dht(host) -> KadDHT:
    dht = KadDHT(host, DHTMode.SERVER, strict_validation=True)
    dht.register_validator(MANIFEST_NS, ManifestValidator())
    return dht


async def find_provider_ids(dht: KadDHT, key: bytes, exclude: object = None, timeout: float = 10.0) -> dict:
    """Providers of `key` on the network, de-duplicated by peer id: {peer_id: PeerInfo}.

    py-libp2p's `find_providers` returns whatever the local provider store holds (including our own
    record, and results cached from earlier lookups) without asking the network. We need fresh
    answers (a partial host must still find the others; a dead provider must age out), so we look up
    the closest peers to the key and ask each of them, in parallel, plus any local records.
    """
    store = dht.provider_store
    found = {p.peer_id: p for p in store.get_providers(key)}
    closest = await dht.peer_routing.find_closest_peers_network(key)

    async def ask(peer: object) -> None:
        with trio.move_on_after(timeout):
            try:
                providers, _ = await store._get_providers_from_peer_with_closers(peer, key)
            except Exception:  # noqa: BLE001 - an unreachable peer simply contributes nothing
                return
            for p in providers:
                found.setdefault(p.peer_id, p)

    async with trio.open_nursery() as nursery:
        for peer in closest:
            if peer != dht.host.get_id():
                nursery.start_soon(ask, peer)
    return {pid: info for pid, info in found.items() if pid != exclude}


@dataclass
class PrefixHit:
    n_tokens: int  # the prompt's tokens covered by `key`
    key: bytes
    providers: dict  # peer_id -> PeerInfo
    queries: int


async def find_longest_prefix(dht: KadDHT, model_id: bytes, tokens: list[int], block_size: int,
                              exclude: object = None) -> PrefixHit | None:
    """The longest block boundary of `tokens` that some provider announces, in O(log blocks) queries."""
    keys = [k for k in chain.chain_keys(model_id, tokens, block_size) if k.n_tokens % block_size == 0]
    if not keys:
        return None
    queries = 0

    async def probe(i: int) -> dict:
        nonlocal queries
        queries += 1
        return await find_provider_ids(dht, keys[i].key, exclude)

    last = await probe(len(keys) - 1)
    if last:
        return PrefixHit(keys[-1].n_tokens, keys[-1].key, last, queries)
    lo, hi, best, best_i = 0, len(keys) - 2, None, -1  # invariant: boundaries > hi have no provider
    while lo <= hi:
        mid = (lo + hi) // 2
        found = await probe(mid)
        if found:
            best, best_i, lo = found, mid, mid + 1
        else:
            hi = mid - 1
    if best is None:
        return None
    return PrefixHit(keys[best_i].n_tokens, keys[best_i].key, best, queries)
