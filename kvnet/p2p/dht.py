"""The kvnet DHT: Kademlia on a private protocol id, validated records, provider records by prefix.

- Protocol `/kvnet/kad/1.0.0`, so kvnet never talks to (or trusts) the public IPFS DHT. py-libp2p
  copies its protocol id into several modules; `compat.use_dht_protocol` patches them all.
- Strict validation: only namespaced keys with a registered validator are accepted. The one value
  namespace is `/kvm/<base64url(manifest id)>` (48 bytes: py-libp2p drops lookup keys over 50 bytes),
  holding signed manifest bytes; a value is accepted only if BLAKE3(value) is the id in the key and
  the manifest parses, verifies and has not expired.
- Provider records are keyed by raw 32-byte ids: each manifest id, and only the chain keys at block
  counts that are powers of two (1, 2, 4, 8, ... blocks) whose covering pieces the provider holds.
  A 640-block document is 11 records instead of 641: every record costs a Kademlia lookup plus up
  to 20 ADD_PROVIDER messages, and announcing them all kept `kvnet fetch` busy for a minute.
- Prefix lookup: "some provider has boundary 2^j" is monotone in j, so the longest announced
  power-of-two boundary of a prompt is found by a (fanout+1)-ary search over those boundaries
  (O(log log blocks) provider queries). The offers then carry the full signed chain, which extends
  the match to the exact longest common prefix (see `kvnet.p2p.node.Node.find`, docs/discovery.md).
"""

from __future__ import annotations

import base64
import logging
from collections import deque
from dataclasses import dataclass

import trio
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.records.validator import Validator

from kvnet import chain
from kvnet.hashing import b3
from kvnet.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestError, parse
from kvnet.p2p import compat

DHT_PROTOCOL = "/kvnet/kad/1.0.0"
MANIFEST_NS = "kvm"
ALPHA = 3  # Kademlia's query parallelism
# ADD_PROVIDER messages a node accepts per peer per 10 s window; announcers pace themselves to
# PROVIDE_RATE_MAX per window, below it (docs/discovery.md).
PROVIDER_RATE_MAX = 64
PROVIDE_RATE_MAX = 48
PROVIDE_RATE_WINDOW_S = 11.0
log = logging.getLogger("kvnet.p2p.dht")


compat.use_dht_protocol(DHT_PROTOCOL)


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


def is_announced_block_count(blocks: int) -> bool:
    """Chain keys are announced only at 1, 2, 4, 8, ... full blocks."""
    return blocks > 0 and blocks & (blocks - 1) == 0


def announce_keys(m: Manifest, mid: bytes, have: set[int]) -> list[bytes]:
    """The provider records a holder of pieces `have` of manifest `m` (id `mid`) announces.

    The manifest id (if it holds anything), then the chain key at every power-of-two full-block count
    whose covering pieces are all held. The partial tail key is never announced: a prompt containing
    a document's tail is matched from the offer's signed chain instead.
    """
    if not have:
        return []
    keys = [mid]
    full_blocks = m.n_tokens // m.block_size
    blocks = 1
    while blocks <= full_blocks:
        if all(p in have for p in m.pieces_for_tokens(blocks * m.block_size)):
            keys.append(m.chain[blocks - 1])
        blocks *= 2
    return keys


async def provide(dht: KadDHT, key: bytes, timeout: float) -> None:
    """One provider record for `key` at the closest peers (bounded by `timeout`).

    The key is taken off py-libp2p's own re-provide list again (compat.forget_provided_key): kvnet
    republishes from its store on its own schedule (docs/discovery.md).
    """
    try:
        with trio.move_on_after(timeout):
            await dht.provider_store.provide(key)
    finally:
        compat.forget_provided_key(dht, key)


class ProvidePacer:
    """Start at most `limit` provide() calls per `window` seconds (sliding), across all artifacts.

    Why: every provide() sends one ADD_PROVIDER to each of the key's closest peers, and a kvnet node
    accepts only PROVIDER_RATE_MAX of them per peer per 10 s (resetting the rest). In a small
    network every node is among the closest to every key, so an unpaced announcement of a few
    artifacts would have records refused. The window is a second longer than the receiver's.
    """

    def __init__(self, limit: int = PROVIDE_RATE_MAX, window: float = PROVIDE_RATE_WINDOW_S) -> None:
        self.limit, self.window = limit, window
        self._starts: deque[float] = deque()
        self._lock = trio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            while True:
                now = trio.current_time()
                while self._starts and now - self._starts[0] >= self.window:
                    self._starts.popleft()
                if len(self._starts) < self.limit:
                    self._starts.append(now)
                    return
                await trio.sleep_until(self._starts[0] + self.window)


def make_dht(host) -> KadDHT:
    dht = KadDHT(host, DHTMode.SERVER, strict_validation=True)
    compat.set_provider_rate_limit(dht, PROVIDER_RATE_MAX)
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
    me = dht.host.get_id()
    closest = [p for p in await dht.peer_routing.find_closest_peers_network(key) if p != me]

    answered = 0

    async def ask(peer: object) -> None:
        nonlocal answered
        with trio.move_on_after(timeout):
            try:
                providers = await compat.providers_from_peer(dht, peer, key)
            except Exception:  # noqa: BLE001 - an unreachable peer simply contributes nothing
                return
            answered += 1
            for p in providers:
                found.setdefault(p.peer_id, p)

    # Providers store their records at the closest peers to the key, so the closest peers that answer
    # hold (nearly) the full set: ask them ALPHA at a time, closest first, until ALPHA of them have
    # answered and some provider is known (dead or departed peers do not count as answers).
    for start in range(0, len(closest), ALPHA):
        async with trio.open_nursery() as nursery:
            for peer in closest[start : start + ALPHA]:
                nursery.start_soon(ask, peer)
        if answered >= ALPHA and any(pid not in (me, exclude) for pid in found):
            break
    return {pid: info for pid, info in found.items() if pid not in (me, exclude)}


@dataclass
class PrefixHit:
    n_tokens: int  # the prompt's tokens covered by `key`
    key: bytes
    providers: dict  # peer_id -> PeerInfo
    queries: int


async def find_longest_prefix(dht: KadDHT, model_id: bytes, tokens: list[int], block_size: int,
                              exclude: object = None, fanout: int = 4) -> PrefixHit | None:
    """The prompt's longest power-of-two block boundary that some provider announces.

    Providers announce the keys at 1, 2, 4, ... blocks of what they hold, so "boundary 2^j has a
    provider" is monotone in j. We search it in rounds of `fanout` parallel probes spread over the
    unresolved interval (the last boundary is in the first round): a 640-block prompt has 10 such
    boundaries, found in at most 2 rounds. The caller extends the hit to the exact longest common
    prefix from the offers' signed chains.
    """
    keys = [k for k in chain.chain_keys(model_id, tokens, block_size)
            if k.n_tokens % block_size == 0 and is_announced_block_count(k.n_tokens // block_size)]
    if not keys:
        return None
    lo, hi = 0, len(keys) - 1  # the answer is in [lo - 1, hi]; lo - 1 == -1 means none
    best: tuple[int, dict] | None = None
    queries = 0
    while lo <= hi:
        span = hi - lo + 1
        probes = sorted({hi - (span * j) // fanout for j in range(fanout)} | {hi})
        results: dict[int, dict] = {}

        async def probe(i: int, results: dict[int, dict] = results) -> None:
            results[i] = await find_provider_ids(dht, keys[i].key, exclude)

        async with trio.open_nursery() as nursery:
            for i in probes:
                nursery.start_soon(probe, i)
        queries += len(probes)
        hits = [i for i in probes if results[i]]
        misses = [i for i in probes if not results[i]]
        if hits:
            top = max(hits)
            best = (top, results[top])
            lo = top + 1
        above = [i for i in misses if i > (best[0] if best else -1)]
        hi = min(above) - 1 if above else hi
        if best and best[0] == hi:
            break
        if not hits and probes[0] == lo:
            break  # even the lowest probe in range has no provider
    if best is None:
        return None
    i, providers = best
    return PrefixHit(keys[i].n_tokens, keys[i].key, providers, queries)
