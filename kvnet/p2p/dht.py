"""The kvnet DHT: Kademlia on a private protocol id, validated records, provider records by prefix.

- Protocol `/kvnet/kad/1.0.0`, so kvnet never talks to (or trusts) the public IPFS DHT. py-libp2p
  copies its protocol id into several modules; `compat.use_dht_protocol` patches them all.
- Strict validation: only namespaced keys with a registered validator are accepted. The one value
  namespace is `/kvm/<base64url(manifest id)>` (48 bytes: py-libp2p drops lookup keys over 50 bytes),
  holding signed manifest bytes; a value is accepted only if BLAKE3(value) is the id in the key and
  the manifest parses, verifies and has not expired. Fraud proofs go under `/kvf/<base64url(manifest
  id)>` (docs/audits.md), accepted if they pass every rule that needs no model.
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
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.records.validator import Validator

from kvnet import chain, fraud
from kvnet.hashing import b3
from kvnet.manifest import Manifest, ManifestError, parse
from kvnet.p2p import compat, dht_limits
from kvnet.p2p.dht_limits import MANIFEST_RECORD_MAX_BYTES

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
    """Accept a manifest record only if it is exactly the signed, unexpired manifest its key names,
    and at most MANIFEST_RECORD_MAX_BYTES (kvnet.p2p.dht_limits: what a real manifest needs).

    Verifying a manifest takes 1-90 ms (measured: 163 KB in 18 ms), too long for the event loop, so
    the DHT handler guard (compat section 5) validates a PUT_VALUE in a worker thread first; the
    record's key and BLAKE3 are then remembered for a short while, and py-libp2p's own synchronous
    `validate` call on the same record only re-hashes it.
    """

    RECENT_MAX = 64  # validated (key, hash) pairs remembered
    RECENT_S = 30.0  # for this long: a manifest that expires in between is refused on the next put

    def __init__(self) -> None:
        self._recent: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._lock = threading.Lock()  # validate runs in worker threads too

    def validate(self, key: str, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray) or len(value) > MANIFEST_RECORD_MAX_BYTES:
            raise ValueError("manifest record too large or not bytes")
        digest = b3(value)
        if digest != _mid_from_key(key):
            raise ValueError("manifest record does not hash to its key")
        now = time.monotonic()
        with self._lock:
            seen = self._recent.get((key, digest))
            if seen is not None and now - seen < self.RECENT_S:
                return
        try:
            parse(bytes(value))
        except ManifestError as exc:
            raise ValueError(f"manifest record rejected: {exc}") from exc
        with self._lock:
            self._recent[(key, digest)] = now
            self._recent.move_to_end((key, digest))
            while len(self._recent) > self.RECENT_MAX:
                self._recent.popitem(last=False)

    def select(self, key: str, values: list[bytes]) -> int:
        return 0  # every valid value for a key is the same bytes (the key is their hash)


# -- fraud proofs (docs/audits.md, "Proofs on the DHT") ----------------------------------------------

PROOF_NS = "kvf"
PROOF_RECORD_MAX_BYTES = MANIFEST_RECORD_MAX_BYTES  # a record holds its proof, which holds its manifest


def proof_key(mid: bytes) -> str:
    """`/kvf/<base64url(manifest id)>`: fraud proofs against that manifest (48 bytes, like /kvm/)."""
    return f"/{PROOF_NS}/" + base64.urlsafe_b64encode(mid).rstrip(b"=").decode()


class ProofValidator(Validator):
    """Accept a proof record only if its envelope is signed by its author and its proof passes every
    rule that needs no model (kvnet.fraud.open_record: encoding, the author's signature, the signature
    of the manifest the proof holds, the tokens' chain keys), and it accuses the manifest its key
    names. The recomputation needs the producer's model: a node acts on a proof only after
    `kvnet.fraud.verify_proof`, never on this check alone. Validated records are remembered for a
    short while, like ManifestValidator's, so py-libp2p's second synchronous call is cheap."""

    RECENT_MAX = 64
    RECENT_S = 30.0

    def __init__(self) -> None:
        self._recent: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._lock = threading.Lock()

    def validate(self, key: str, value: bytes) -> None:
        if not isinstance(value, bytes | bytearray) or len(value) > PROOF_RECORD_MAX_BYTES:
            raise ValueError("proof record too large or not bytes")
        prefix = f"/{PROOF_NS}/"
        if not key.startswith(prefix):
            raise ValueError(f"not a proof key: {key!r}")
        digest, now = b3(value), time.monotonic()
        with self._lock:
            seen = self._recent.get((key, digest))
            if seen is not None and now - seen < self.RECENT_S:
                return
        try:
            proof = fraud.open_record(bytes(value))
        except fraud.ProofError as exc:
            raise ValueError(f"proof record rejected: {exc}") from exc
        if proof_key(proof.manifest_id) != key:
            raise ValueError("proof record accuses another manifest than its key names")
        with self._lock:
            self._recent[(key, digest)] = now
            while len(self._recent) > self.RECENT_MAX:
                self._recent.popitem(last=False)

    def select(self, key: str, values: list[bytes]) -> int:
        """Any valid proof will do; the smallest is the cheapest to verify (ties: the first)."""
        return min(range(len(values)), key=lambda i: len(values[i]))


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
    """A kvnet DHT server on `host`: strict validation, the manifest validator, and the server-side
    bounds of kvnet.p2p.dht_limits (the handler guard with its deadlines and caps, bounded provider
    and value stores), all installed through compat (section 5)."""
    dht = KadDHT(host, DHTMode.SERVER, strict_validation=True)
    compat.set_provider_rate_limit(dht, PROVIDER_RATE_MAX)
    dht.register_validator(MANIFEST_NS, ManifestValidator())
    dht.register_validator(PROOF_NS, ProofValidator())
    compat.install_dht_stores(dht, dht_limits.BoundedProviderStore(host, dht.peer_routing),
                              dht_limits.BoundedValueStore(host, dht.local_peer_id))
    compat.guard_dht_handler(dht)
    return dht


LOOKUP_MAX_QUERIES = 64  # GET_PROVIDERS queries one provider lookup may send (docs/discovery.md)
LOOKUP_TIMEOUT_S = 60.0  # wall time of one provider lookup, offers included
LOOKUP_SEED_PEERS = 40  # routing-table peers closest to the key added to the walk's first candidates
# GET_PROVIDERS queries in flight at once. More than Kademlia's ALPHA: under a Sybil attack most
# answers are lies or stalls, and each query to a peer not yet connected costs a dial.
LOOKUP_PARALLEL = 10
LOOKUP_SATISFIED_GRACE_S = 1.0
"""Once the walk is satisfied (a verified offer), how long it may still wait for ALPHA answers and
offers in progress before it ends anyway: Sybils that answer slowly must not hold a found lookup."""

OnProviders = Callable[[list], Awaitable[bool]]


@dataclass
class LookupStats:
    queries: int = 0  # GET_PROVIDERS sent
    answered: int = 0  # of which answered with something (an empty answer is indistinguishable from a failure)
    providers: int = 0  # distinct providers seen
    done: bool = False  # stopped because `on_providers` was satisfied (not exhausted / out of time)
    asked: list = field(default_factory=list)  # peer ids in the order they were asked (at most max_queries)


async def lookup_providers(dht: KadDHT, key: bytes, on_providers: OnProviders, *, exclude: object = None,
                           avoided: Callable[[object], bool] | None = None,
                           preferred: Callable[[object], bool] | None = None, timeout: float = 10.0,
                           max_queries: int = LOOKUP_MAX_QUERIES, deadline_s: float = LOOKUP_TIMEOUT_S,
                           alpha: int = ALPHA, parallel: int = LOOKUP_PARALLEL,
                           satisfied_grace_s: float = LOOKUP_SATISFIED_GRACE_S) -> LookupStats:
    """Walk the peers closest to `key`, asking each for providers, until `on_providers` is satisfied.

    Why not py-libp2p's lookup: Sybil peers that are (or claim to be) closest to a key answer first,
    with only themselves; a lookup that stops once a few peers answered and *some* provider is known
    never reaches the real holder (20 liars made 9 of 9 honest fetches fail). So:

    - candidates are the routing table's `LOOKUP_SEED_PEERS` closest, the network's closest peers
      (an iterative FIND_NODE, run alongside, joining when it answers), and every closer peer an
      answer names; none is asked twice;
    - `parallel` queries are kept in flight, closest first, except that peers `preferred` (the
      node's bootstrap peers and peers with a good score: a Sybil cannot grind its way into that set)
      go before all others, and peers `avoided` (by persistent score) after all others;
    - every batch of providers not seen before goes to `on_providers` (which asks them for offers and
      verifies those); the walk stops once it returns True, after at least `alpha` answers or
      `satisfied_grace_s` later (whichever comes first), or when no candidate is left, `max_queries`
      were sent, or `deadline_s` passed.
    Local provider records are handed over first.
    """
    me = dht.host.get_id()
    stats = LookupStats()
    seen: set = {me, exclude}
    asked: set = {me, exclude}
    candidates: dict = {}  # peer id -> (avoided, not preferred, XOR distance to the key): lowest first
    target = hashlib.sha256(key).digest()
    wake = trio.Event()
    in_flight = 0
    handing = 0  # workers inside `on_providers`
    seeding = True  # the network's closest peers may still be added
    satisfied = False
    found = trio.Event()  # set once satisfied

    def add(peers: list) -> None:
        nonlocal wake
        for p in peers:
            if p not in asked and p not in candidates:
                dist = int.from_bytes(hashlib.sha256(p.to_bytes()).digest(), "big") ^ int.from_bytes(target, "big")
                candidates[p] = (bool(avoided and avoided(p)), not (preferred and preferred(p)), dist)
        wake.set()
        wake = trio.Event()

    async def hand_over(providers: list) -> None:
        nonlocal satisfied
        new = []
        for info in providers:
            if info.peer_id not in seen:
                seen.add(info.peer_id)
                new.append(info)
        stats.providers += len(new)
        if new and await on_providers(new):
            satisfied = True
            found.set()

    async def seed_from_network() -> None:
        nonlocal seeding
        try:
            with trio.move_on_after(timeout):
                add(list(await dht.peer_routing.find_closest_peers_network(key)))
        except Exception as exc:  # noqa: BLE001 - the routing table still seeds the walk
            log.debug("closest-peer lookup failed: %r", exc)
        finally:
            seeding = False
            add([])

    async def end_after_grace(cancel: trio.CancelScope) -> None:
        await found.wait()
        await trio.sleep(satisfied_grace_s)
        stats.done = True
        cancel.cancel()

    async def worker(cancel: trio.CancelScope) -> None:
        nonlocal in_flight, handing
        while True:
            if satisfied and stats.answered >= alpha:
                if handing == 0:  # never cut off offers still being asked for
                    stats.done = True
                    cancel.cancel()
                    return
                await wake.wait()
                continue
            if not candidates or stats.queries >= max_queries:
                if (in_flight == 0 and not seeding) or stats.queries >= max_queries:
                    if satisfied and handing == 0:
                        stats.done = True
                        cancel.cancel()
                    return
                await wake.wait()
                continue
            peer = min(candidates, key=candidates.__getitem__)
            del candidates[peer]
            asked.add(peer)
            stats.asked.append(peer)
            stats.queries += 1
            in_flight += 1
            providers: list = []
            try:
                with trio.move_on_after(timeout):
                    providers, closer = await compat.providers_and_closers_from_peer(dht, peer, key)
                    if providers or closer:
                        stats.answered += 1
                    add(closer)
                # outside the query's deadline: the offers asked here have deadlines of their own
                handing += 1
                try:
                    await hand_over(providers)
                finally:
                    handing -= 1
            except Exception as exc:  # noqa: BLE001 - an unreachable peer contributes nothing
                log.debug("GET_PROVIDERS to %s failed: %r", peer, exc)
            finally:
                in_flight -= 1
                add([])  # wake the others: a slot is free or the walk may be over

    with trio.move_on_after(deadline_s):
        await hand_over(list(dht.provider_store.get_providers(key)))
        add(dht.routing_table.find_local_closest_peers(key, LOOKUP_SEED_PEERS))
        async with trio.open_nursery() as outer:
            outer.start_soon(end_after_grace, outer.cancel_scope)
            async with trio.open_nursery() as walk:
                walk.start_soon(seed_from_network)  # joins the walk when it answers, never holds it up
                for _ in range(parallel):
                    walk.start_soon(worker, outer.cancel_scope)
            outer.cancel_scope.cancel()  # the walk ended on its own: stop waiting for the grace
    stats.done = stats.done or satisfied
    return stats


async def find_provider_ids(dht: KadDHT, key: bytes, exclude: object = None, timeout: float = 10.0,
                            avoided: Callable[[object], bool] | None = None) -> dict:
    """Providers of `key` on the network, de-duplicated by peer id: {peer_id: PeerInfo}, unverified.

    py-libp2p's `find_providers` returns whatever the local provider store holds (including our own
    record, and results cached from earlier lookups) without asking the network. We need fresh
    answers (a partial host must still find the others; a dead provider must age out), so we walk
    the closest peers (`lookup_providers`) until `ALPHA` of them have answered and some provider is
    known. This trusts what peers say: a node that fetches uses `kvnet.p2p.node.Node`'s lookups,
    which stop only on offers that verify.
    """
    found: dict = {}

    async def collect(providers: list) -> bool:
        for p in providers:
            found.setdefault(p.peer_id, p)
        return True

    await lookup_providers(dht, key, collect, exclude=exclude, avoided=avoided, timeout=timeout)
    me = dht.host.get_id()
    return {pid: info for pid, info in found.items() if pid not in (me, exclude)}


@dataclass
class PrefixHit:
    n_tokens: int  # the prompt's tokens covered by `key`
    key: bytes
    providers: Any  # what the probe returned: by default {peer_id: PeerInfo}
    queries: int


Probe = Callable[[bytes, int], Awaitable[Any]]


async def find_longest_prefix(dht: KadDHT, model_id: bytes, tokens: list[int], block_size: int,
                              exclude: object = None, fanout: int = 4, probe: Probe | None = None
                              ) -> PrefixHit | None:
    """The prompt's longest power-of-two block boundary that some provider announces.

    Providers announce the keys at 1, 2, 4, ... blocks of what they hold, so "boundary 2^j has a
    provider" is monotone in j. We search it in rounds of `fanout` parallel probes spread over the
    unresolved interval (the last boundary is in the first round): a 640-block prompt has 10 such
    boundaries, found in at most 2 rounds. The caller extends the hit to the exact longest common
    prefix from the offers' signed chains.

    `probe(key, n_tokens)` decides whether a boundary is held; anything truthy is a hit and becomes
    the hit's `providers`. By default it is `find_provider_ids` (any provider record counts); a node
    passes one that counts only offers that verify, so a liar announcing a boundary it does not
    hold makes that boundary a miss instead of the answer.
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

        async def one(i: int, results: dict[int, Any] = results) -> None:
            if probe is None:
                results[i] = await find_provider_ids(dht, keys[i].key, exclude)
            else:
                results[i] = await probe(keys[i].key, keys[i].n_tokens)

        async with trio.open_nursery() as nursery:
            for i in probes:
                nursery.start_soon(one, i)
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
