"""A kvnet network node: a libp2p host + the kvnet DHT + the offer/pieces servers + the fetcher.

    node = Node(key, store)
    async with trio.open_nursery() as n:
        await n.start(node.run)                             # or node.run(announce=False): fetch only
        hit = await node.find(model_id, prompt_tokens)      # DHT prefix lookup + offers
        await node.fetch(hit)                               # verified multi-provider fetch

Announcing (docs/discovery.md): a running node announces what its store holds when it starts, then
whatever appears in the store (published or fetched by any process on the same home) within
`watch_s` seconds, the whole store again hourly, and again when its routing table has at least
doubled (at most once a minute). A node run with `announce=False` (a `kvnet fetch` process, which
exits right after) announces nothing: its records would point at a process that is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from kvnet import chain
from kvnet.errors import BootstrapError
from kvnet.ledger import Ledger, SpendingLimitError, SpendingLimits
from kvnet.manifest import ManifestError, SignedManifest, parse
from kvnet.p2p import billing, bulk_wire, compat, proofs, wire
from kvnet.p2p import dht as kdht
from kvnet.p2p.bulk_server import BulkServer
from kvnet.p2p.fetcher import BULK_BATCH, FetchError, FetchResult, Provider, fetch_pieces
from kvnet.p2p.host import (
    DEFAULT_LISTEN,
    REFUSED_HINT,
    ConnectionLimits,
    closed_before_handshake,
    make_host,
    peer_info,
    quiet_logs,
    running,
)
from kvnet.p2p.scores import PeerScores
from kvnet.p2p.server import (
    OFFER_PROTOCOL,
    PIECES_PROTOCOL,
    HostingTerms,
    PieceServer,
    ServeLimits,
    StoreRunner,
)
from kvnet.refusals import Refusals
from kvnet.store import Store

log = logging.getLogger("kvnet.p2p.node")
PEER_ADDR_TTL = 3600
# py-libp2p's DHT server handles at most 12 requests at once and resets the rest (which then stall
# for 30 s), so announcements stay below that.
ANNOUNCE_CONCURRENCY = 8
GROWTH_CHECK_S = 2.0
GROWTH_MIN_INTERVAL_S = 60.0
WATCH_S = 2.0
MAX_OFFERS_READ = 8
OFFER_CONCURRENCY = 8  # offer requests one provider lookup has in flight at once
OFFER_TIMEOUT_S = 5.0  # an offer is one small round trip (dial included): a peer slower than this is skipped
OFFER_GRACE_S = 1.0  # how long other offers may still arrive once one verified
# fresh lookups of a manifest a fetch makes once its providers (reserves included) failed it; each
# skips the providers that failed, so a phantom offer that ended the first lookup cannot end them
MAX_RELOOKUPS = 2
# a drop that is no lie (a stream that would not open): such a provider may be asked again by a
# re-lookup, where its fresh offer must verify like anyone's (a vanished one offers nothing). Every
# other drop keeps it out for the rest of the fetch: `missing` for pieces its offer claimed, a lie, and
# `refused` too (busy or rate limited: asking again a second later only spends its budget and ours)
NOT_A_LIE = frozenset({"unreachable"})
# libp2p logs every failed dial to a departed peer at ERROR (hundreds of lines a minute in a devnet);
# kvnet logs what matters about peers itself, on its own loggers.
LIBP2P_LOG_LEVEL = logging.CRITICAL


def validate_bootstrap(addrs: list[str]) -> list[str]:
    """Every bootstrap address must be a TCP multiaddr ending in /p2p/<peer id>; name the first bad one."""
    for addr in addrs:
        try:
            info = peer_info(addr)
        except ValueError as exc:
            raise BootstrapError(f"malformed bootstrap address {addr!r}: want /ip4/<ip>/tcp/<port>/p2p/<peer id> "
                                 f"({_cause(exc)})") from exc
        if not any("/tcp/" in str(a) for a in info.addrs):
            raise BootstrapError(f"malformed bootstrap address {addr!r}: kvnet dials TCP only "
                                 "(want /ip4/<ip>/tcp/<port>/p2p/<peer id>)")
    return list(addrs)


def _cause(exc: BaseException, limit: int = 160) -> str:
    """A one-line reason from an exception (the first leaf of a group), for logs and error lines."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc.__cause__ or exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GrowthPolicy:
    """Whether routing-table growth is worth announcing everything again.

    Records belong at the peers closest to each key; a node that announced knowing few peers (the
    first node of a network) should announce again once many more have joined, but re-announcing on
    every arrival made each new peer cost every provider a full round. So: only when the table has
    at least doubled since the last announcement, and at most once per `min_interval_s`.
    """

    def __init__(self, min_interval_s: float = GROWTH_MIN_INTERVAL_S) -> None:
        self.min_interval_s = min_interval_s
        self.size_at_announce = 0
        self.last_growth_announce = -math.inf

    def announced(self, size: int) -> None:
        """Any full announcement (start, republish, growth) sets the baseline."""
        self.size_at_announce = size

    def due(self, size: int, now: float) -> bool:
        return (size > 0 and size >= 2 * self.size_at_announce
                and now - self.last_growth_announce >= self.min_interval_s)

    def growth_announced(self, size: int, now: float) -> None:
        self.announced(size)
        self.last_growth_announce = now


@dataclass
class Offer:
    peer: str
    signed: SignedManifest
    have: set[int]
    fee_per_mib: int = 0  # the offering host's hosting fee (the offer answer's, for all its offers)
    currency: str = "USD"

    def provider(self) -> Provider:
        return Provider(self.peer, set(self.have), fee_per_mib=self.fee_per_mib, currency=self.currency)


@dataclass
class Found:
    """Where to get the KV for the longest network-held prefix of a prompt."""

    signed: SignedManifest
    n_tokens: int  # prompt tokens this manifest covers
    providers: list[Provider]
    dht_queries: int = 0
    offers: list[Offer] = field(default_factory=list)


@dataclass
class AnnounceStats:
    """What this node announced (counted, so tests and benchmarks can check it without timings)."""

    provides: int = 0  # provider records sent (one DHT provide() call each)
    values: int = 0  # manifests put as DHT values
    rounds: int = 0  # full announcements of the whole store
    growth_rounds: int = 0  # of which triggered by routing-table growth
    growth_checks: int = 0  # growth-loop ticks
    watch_ticks: int = 0  # store polls


class Node:
    def __init__(self, key: Ed25519PrivateKey, store: Store, *, listen: list[str] | None = None,
                 bootstrap: list[str] | None = None, scores_path: Path | None = None,
                 terms: HostingTerms | None = None, republish_s: float = 3600.0, refresh_s: float = 60.0,
                 timeout: float = 10.0, watch_s: float = WATCH_S, growth_check_s: float = GROWTH_CHECK_S,
                 growth_min_interval_s: float = GROWTH_MIN_INTERVAL_S,
                 serve_limits: ServeLimits | None = None, conn_limits: ConnectionLimits | None = None,
                 bulk_listen: int | None = 0, ledger: Ledger | None = None, credit_window: int | None = None,
                 spending: SpendingLimits | None = None, refusals: Refusals | None = None,
                 proofs_dir: Path | None = None) -> None:
        """`bulk_listen`: the TCP port of the bulk listener (on the IP of the first listen address;
        0 picks a free one), or None to serve no bulk path (fetches from this node then use streams).
        Payments (kvnet.p2p.billing): `ledger` (default: one in memory), `credit_window` in micro-units
        (default: the cost of 64 MiB at `terms`' fee), `spending` limits (default: none)."""
        self.key = key
        self.store = store
        self.runner = StoreRunner(store)
        self.listen = listen or [DEFAULT_LISTEN]
        self.bootstrap = bootstrap or []
        self.scores = PeerScores(scores_path)
        self.server = PieceServer(self.runner, terms, request_timeout=timeout, limits=serve_limits,
                                  on_abuse=lambda peer, code: self.scores.bad_at_most_every(
                                      peer, "abuse", self.server.limits.window_s))
        self.republish_s, self.refresh_s, self.timeout = republish_s, refresh_s, timeout
        self.watch_s, self.growth_check_s = watch_s, growth_check_s
        self.growth = GrowthPolicy(growth_min_interval_s)
        # a peer whose stream is reset at a connection or DHT cap is scored down (at most once a minute)
        self.host = make_host(key, limits=conn_limits, on_over_limit=lambda peer, cap: self.scores.over_limit(peer))
        quiet_logs(LIBP2P_LOG_LEVEL)
        self.dht = kdht.make_dht(self.host)
        self.peer_id: ID = self.host.get_id()
        self.stats = AnnounceStats()
        self.pacer = kdht.ProvidePacer()
        self.announcing = True
        self.bootstrap_reached: list[str] = []
        self.bootstrap_failed: dict[str, str] = {}  # address -> why
        self._background: trio.Nursery | None = None
        self._announce_lock = trio.Lock()
        self._provided: dict[bytes, set[bytes]] = {}  # manifest id -> keys announced for it
        self._seen: dict[bytes, int] = {}  # manifest id -> pieces present when last announced
        self._bootstrap_ids: set[ID] = set()  # asked first by lookups (Node._preferred)
        self.bulk_listen = bulk_listen
        self.bulk: BulkServer | None = None  # the bulk listener, while running
        self.ledger = ledger if ledger is not None else Ledger(Path(":memory:"), key)
        self.server.biller = billing.Biller(self.ledger, self.server.terms.fee_per_mib, self.server.terms.currency,
                                            credit_window, get_manifest=lambda mid: self.runner.call(
                                                self.store.get_manifest, mid))
        self.payer = billing.Payer(self.ledger, spending)
        self.last_paid: dict[str, int] = {}  # peer -> micro-units signed for hosting in the last fetch
        # fraud proofs (kvnet.p2p.proofs): refused manifests and blamed keys; this home's own proof files
        # to put in the DHT; the verifier a process running the model sets (None: proofs are not judged)
        self.refusals = refusals if refusals is not None else Refusals(None)
        self.proofs_dir, self.proofs_skipped = proofs_dir, set()
        self.proof_verifier: proofs.Verifier | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, announce: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen, join through the bootstrap peers, announce (unless `announce` is False), serve.

        Unreachable bootstrap peers never raise: they are logged and listed in `bootstrap_failed`
        (a malformed address does raise `BootstrapError`, before anything starts; an address that
        cannot be listened on raises `ListenError`).
        """
        validate_bootstrap(self.bootstrap)
        self.announcing = announce
        async with running(self.host, self.listen):  # ListenError if an address cannot be listened on
            self.host.set_stream_handler(OFFER_PROTOCOL, self.server.handle_offer)
            self.host.set_stream_handler(PIECES_PROTOCOL, self.server.handle_pieces)
            self.host.set_stream_handler(billing.RECEIPTS_PROTOCOL, self.server.handle_receipts)
            async with self._bulk_listener(), background_trio_service(self.dht), trio.open_nursery() as nursery:
                # A fetch-only node looks up at once: its lookup walks on from the bootstrap peers'
                # answers, so filling the routing table waits in the background (with Sybils
                # answering the refresh it can take the whole timeout, 10 s, before any lookup).
                await self._join(refresh_in=None if announce else nursery)
                if announce:
                    await self.announce_all()
                self._background = nursery
                if announce:
                    nursery.start_soon(self._republish_loop)
                    nursery.start_soon(self._growth_loop)
                    nursery.start_soon(self._watch_loop)
                nursery.start_soon(self._refresh_loop)
                task_status.started(self)
                await trio.sleep_forever()

    @contextlib.asynccontextmanager
    async def _bulk_listener(self):
        """Run the bulk listener (unless `bulk_listen` is None) and its `/kvnet/bulk/1.0.0` handler."""
        if self.bulk_listen is None:
            yield
            return
        self.bulk = BulkServer(self.server, _listen_ip(self.listen[0]), self.bulk_listen)
        self.bulk.start()
        self.host.set_stream_handler(bulk_wire.BULK_PROTOCOL, self.bulk.handle_bulk)
        try:
            yield
        finally:
            self.bulk.stop()

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    async def _join(self, refresh_in: trio.Nursery | None = None) -> None:
        """Dial every bootstrap peer at once; remember which answered and why the others did not.

        The routing table is then refreshed: before returning, or in `refresh_in` if given.
        """
        self.bootstrap_reached, self.bootstrap_failed = [], {}

        async def one(addr: str) -> None:
            try:
                await self.connect(addr, refresh=False)
                self.bootstrap_reached.append(addr)
            except Exception as exc:  # noqa: BLE001 - a dead bootstrap peer is reported, not fatal
                self.bootstrap_failed[addr] = (f"{REFUSED_HINT} ({_cause(exc)})" if closed_before_handshake(exc)
                                               else _cause(exc))
                log.info("bootstrap peer %s unreachable: %s", addr, self.bootstrap_failed[addr])

        async with trio.open_nursery() as nursery:
            for addr in self.bootstrap:
                nursery.start_soon(one, addr)
        if not self.bootstrap_reached:
            return
        if refresh_in is None:
            await self._refresh_once()
        else:
            refresh_in.start_soon(self._refresh_once)

    async def connect(self, addr: str, *, refresh: bool = True) -> None:
        """Dial a peer and add it to the routing table (connecting alone does not fill it), then
        refresh the table through it unless `refresh` is False."""
        info = peer_info(addr)
        if addr in self.bootstrap:
            self._bootstrap_ids.add(info.peer_id)
        with trio.fail_after(self.timeout):
            await self.host.connect(info)
        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEER_ADDR_TTL)
        await self.dht.add_peer(info.peer_id)
        if refresh:
            await self._refresh_once()

    async def _refresh_once(self) -> None:
        """One routing-table refresh, bounded by the node's timeout; a failure waits for the next round."""
        with trio.move_on_after(self.timeout):
            try:
                await self.dht.refresh_routing_table()
            except Exception as exc:  # noqa: BLE001 - a failed refresh is retried by the refresh loop
                log.debug("routing refresh failed: %s", _cause(exc))

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.refresh_s)
            with trio.move_on_after(self.timeout * 3):
                try:
                    await self.dht.refresh_routing_table()
                except Exception as exc:  # noqa: BLE001 - a failed refresh is retried next round
                    log.debug("routing refresh failed: %s", _cause(exc))

    # -- announcing -----------------------------------------------------------------------------

    async def announce(self, mid: bytes, *, only_new: bool = False) -> int:
        """Provider records for the manifest id and its power-of-two chain keys; the manifest as a value.

        With `only_new`, keys already announced for this manifest are skipped (a growing partial
        artifact adds one key at a time). Returns the number of provider records sent.
        """
        if await proofs.purge_if_refused(self, mid):
            return 0
        sm = await self.runner.call(self.store.get_manifest, mid)
        have = await self.runner.call(self.store.present_pieces, mid)
        done = self._provided.setdefault(mid, set())
        keys = [k for k in kdht.announce_keys(sm.manifest, mid, have) if not (only_new and k in done)]
        if not keys:
            return 0
        put_value = not (only_new and mid in done)
        limiter = trio.CapacityLimiter(ANNOUNCE_CONCURRENCY)

        async def provide(k: bytes) -> None:
            async with limiter:
                await self.pacer.wait()
                self.stats.provides += 1
                await kdht.provide(self.dht, k, self.timeout)
                done.add(k)

        async with trio.open_nursery() as nursery:
            for k in keys:
                nursery.start_soon(provide, k)
        if put_value:
            try:
                self.stats.values += 1
                await self.dht.put_value(kdht.manifest_key(mid), sm.raw)
            except Exception as exc:  # noqa: BLE001 - an expired manifest is still served by offer
                log.info("manifest %s not put in the DHT: %s", mid.hex()[:16], _cause(exc))
        self._seen[mid] = len(have)
        log.info("announced %d provider records for %s", len(keys), mid.hex()[:16])
        return len(keys)

    async def announce_all(self) -> int:
        """Announce everything held; what was evicted is simply no longer announced."""
        async with self._announce_lock:
            self.growth.announced(self.dht.routing_table.size())
            self.stats.rounds += 1
            entries = await self.runner.call(self.store.entries)
            held = {e.id for e in entries if e.present}
            self._forget_except(held)
            sent = 0
            for e in entries:
                if e.present:
                    sent += await self._announce_one(e.id, only_new=False) or 0
            await proofs.publish_pending(self)
            return sent

    def _forget_except(self, held: set[bytes]) -> None:
        for mid in set(self._seen) - held:
            del self._seen[mid]
        for mid in set(self._provided) - held:
            del self._provided[mid]

    async def announce_new(self) -> int:
        """Announce what appeared or grew in the store since it was last announced.

        The store is shared with other processes on the same home (`kvnet publish`, `kvnet fetch`),
        so it is polled: one indexed query, comparing (id, pieces present) with what was announced.
        """
        async with self._announce_lock:
            entries = await self.runner.call(self.store.entries)
            self._forget_except({e.id for e in entries if e.present})
            sent = 0
            for e in entries:
                if e.present and self._seen.get(e.id) != e.present:
                    n = await self._announce_one(e.id, only_new=True)
                    if n is not None:  # a failure is retried on the next poll
                        sent += n
                        self._seen[e.id] = e.present
            return sent

    async def _announce_one(self, mid: bytes, *, only_new: bool) -> int | None:
        """`announce`, but one artifact that fails (removed meanwhile, a DHT error) never stops the rest."""
        try:
            return await self.announce(mid, only_new=only_new)
        except Exception as exc:  # noqa: BLE001 - logged; the next poll or republish tries again
            log.info("announcing %s failed: %s", mid.hex()[:16], _cause(exc))
            return None

    async def _watch_loop(self) -> None:
        while True:
            await trio.sleep(self.watch_s)
            self.stats.watch_ticks += 1
            try:
                await self.announce_new()
            except Exception as exc:  # noqa: BLE001 - retried on the next poll
                log.info("announcing new artifacts failed: %s", _cause(exc))

    async def reannounce_if_grown(self) -> bool:
        """One growth check: announce everything again if the routing table has (at least) doubled."""
        self.stats.growth_checks += 1
        size = self.dht.routing_table.size()
        if not self.growth.due(size, trio.current_time()):
            return False
        self.growth.growth_announced(size, trio.current_time())
        self.stats.growth_rounds += 1
        try:
            await self.announce_all()
        except Exception as exc:  # noqa: BLE001 - retried on the next growth or republish
            log.info("re-announce failed: %s", _cause(exc))
        return True

    async def _growth_loop(self) -> None:
        while True:
            await trio.sleep(self.growth_check_s)
            await self.reannounce_if_grown()

    async def _republish_loop(self) -> None:
        while True:
            await trio.sleep(self.republish_s)
            try:
                await self.announce_all()
            except Exception as exc:  # noqa: BLE001 - retried next round
                log.warning("republish failed: %s", _cause(exc))

    # -- finding --------------------------------------------------------------------------------

    async def offers(self, peer: ID, key: bytes, *, attempts: int = 1) -> list[Offer]:
        """Ask `peer` what it holds for a chain key or manifest id. Lies are scored down.

        A request that gets no answer (dial failure, reset, timeout) is tried again up to `attempts`
        times in all: a lookup gives its preferred peers two, since a provider that served verified
        pieces may be the only honest one, and one lost answer would make the lookup come back empty.
        """
        for _ in range(attempts):
            got = await self._offer_once(peer, key)
            if got is not None:
                return got
        return []

    async def _offer_once(self, peer: ID, key: bytes) -> list[Offer] | None:
        """One `offer` request: the offers, [] for a bad answer (scored down), None for no answer."""
        who = peer.to_base58()
        try:
            with trio.fail_after(min(self.timeout, OFFER_TIMEOUT_S)):
                stream = await self._open(who, OFFER_PROTOCOL)
                try:
                    await wire.write_frame(stream, {"v": wire.PROTOCOL_VERSION, "key": key, "receipt": None})
                    resp = await wire.read_frame(stream, wire.MAX_RESPONSE)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(1.0):  # also when the ask is dropped
                        await stream.close()
            out = []
            fee, currency = wire.field(resp, "fee_per_mib", int), wire.field(resp, "currency", str)
            if fee < 0:
                raise wire.WireError("malformed", "fee_per_mib must be >= 0")
            for o in wire.field(resp, "offers", list)[:MAX_OFFERS_READ]:
                if not isinstance(o, dict):
                    raise wire.WireError("malformed", "offer must be a map")
                sm = parse(wire.field(o, "manifest", bytes))
                have = wire.from_bitfield(wire.field(o, "have", bytes), len(sm.manifest.pieces))
                out.append(Offer(who, sm, have, fee, currency))
            return out
        except (wire.WireError, ManifestError) as exc:
            self.scores.bad(who, "protocol")
            log.warning("bad offer from %s: %s", who, exc)
        except Exception as exc:  # noqa: BLE001 - unreachable or reset peers just offer nothing
            self.scores.bad(who, "unreachable")
            log.debug("no offer from %s: %s", who, _cause(exc))
            return None
        return []

    async def find(self, model_id: bytes, tokens: list[int],
                   block_size: int = chain.DEFAULT_BLOCK_SIZE) -> Found | None:
        """The network's longest prefix of `tokens`.

        The DHT search finds the longest announced power-of-two boundary; a boundary counts as held
        only if some provider's offer verifies for it (a signed manifest whose chain holds the key at
        that boundary), so liars announcing keys they do not hold cannot move the search. The
        verified offers carry the signed chain, which extends the match to the longest common prefix
        (partial tail included).
        """
        async def probe(key: bytes, n: int) -> list[Offer]:
            offers, _ = await self._verified_offers(key, lambda o: _holds_key(o, key, n))
            return offers

        hit = await kdht.find_longest_prefix(self.dht, model_id, tokens, block_size, self.peer_id, probe=probe)
        if hit is None:
            return None
        return _best_for_prefix(hit.providers, hit.key, hit.n_tokens, tokens, hit.queries)

    async def find_manifest(self, manifest_id: bytes) -> Found | None:
        """Who holds (part of) this manifest, and which pieces each has (offers that verify only)."""
        chosen, _ = await self._verified_offers(manifest_id, lambda o: o.signed.id == manifest_id)
        if not chosen:
            return None
        return Found(chosen[0].signed, chosen[0].signed.manifest.n_tokens,
                     [o.provider() for o in chosen], 1, chosen)

    def _preferred(self, peer: ID) -> bool:
        """Peers a lookup asks first, before the closest: the operator's bootstrap peers and peers
        that served verified pieces before (score above 0). Identities ground close to a key are free;
        a place in this set is not."""
        return peer in self._bootstrap_ids or self.scores.get(peer.to_base58()) > 0

    async def _verified_offers(self, key: bytes, accept: Callable[[Offer], bool], *,
                               skip: Collection[str] = (), useful: Callable[[Offer], bool] | None = None
                               ) -> tuple[list[Offer], kdht.LookupStats]:
        """The offers for `key` that `accept` verifies, from a provider lookup that goes on until one
        of them comes from a peer not avoided by score (or the lookup's bounds are reached).

        Every provider the lookup reports is asked for `offer` (best score first, OFFER_CONCURRENCY at
        a time); an offer that parses but does not verify for the key is a lie and is scored down
        (garbage already is, in `offers`). A provider that offers nothing is merely skipped: an
        honest node may have evicted the artifact since it announced it.

        A fetch's re-lookup (`Node.fetch`) passes the providers that failed it as `skip` (not asked:
        a liar scored -3 for a phantom offer is not yet avoided, and its offer would end the lookup
        again) and `useful` (an offer counts towards ending the lookup only if it holds a piece still
        missing; an honest offer of pieces already stored is no lie, just no help).
        """
        good: list[Offer] = []
        limiter = trio.CapacityLimiter(OFFER_CONCURRENCY)

        def satisfied() -> bool:
            return any(not self.scores.avoided(o.peer) and (useful is None or useful(o)) for o in good)

        async def ask(info, first_good: trio.Event) -> None:
            async with limiter:
                got = await self.offers(info.peer_id, key, attempts=2 if self._preferred(info.peer_id) else 1)
            got = [o for o in got if proofs.admissible(self.refusals, o.signed)]  # refused: not a lie
            ok = [o for o in got if accept(o)]
            if len(ok) < len(got):
                score = self.scores.bad(info.peer_id.to_base58(), "protocol")
                log.warning("provider %s offered %d manifest(s) that do not hold key %s (score now %.1f)",
                            info.peer_id.to_base58(), len(got) - len(ok), key.hex()[:16], score)
            good.extend(ok)
            if satisfied():
                first_good.set()

        async def on_providers(infos: list) -> bool:
            infos = [i for i in infos if i.peer_id.to_base58() not in skip]
            if not infos:
                return satisfied()
            for info in infos:
                self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEER_ADDR_TTL)
            first_good = trio.Event()
            async with trio.open_nursery() as outer:
                # Once one offer verifies, the others get OFFER_GRACE_S more (more providers make a
                # faster fetch), then the rest are dropped: a liar that never answers its offer must
                # not hold the lookup for the whole timeout.
                async def grace() -> None:
                    await first_good.wait()
                    await trio.sleep(OFFER_GRACE_S)
                    outer.cancel_scope.cancel()

                outer.start_soon(grace)
                async with trio.open_nursery() as asks:
                    for info in sorted(infos, key=lambda i: -self.scores.get(i.peer_id.to_base58())):
                        asks.start_soon(ask, info, first_good)
                outer.cancel_scope.cancel()
            return satisfied()

        t0 = trio.current_time()
        stats = await kdht.lookup_providers(self.dht, key, on_providers, exclude=self.peer_id,
                                            avoided=lambda pid: self.scores.avoided(pid.to_base58()),
                                            preferred=self._preferred, timeout=self.timeout)
        log.debug("lookup of %s: %d queries, %d answered, %d providers, %d verified offers, %.2f s",
                  key.hex()[:16], stats.queries, stats.answered, stats.providers, len(good),
                  trio.current_time() - t0)
        return good, stats

    # -- fetching -------------------------------------------------------------------------------

    async def _open(self, peer: str, protocol: str):
        pid = ID.from_base58(peer)
        compat.prune_closed_connections(self.host.get_network(), pid)  # else a stale one fails it for good
        return await self.host.new_stream(pid, [protocol])

    async def fetch(self, found: Found, n_tokens: int | None = None, *, on_piece=None, window: int = 4,
                    batch: int = 8, bulk: str | None = bulk_wire.DEFAULT_MODE,
                    bulk_batch: int = BULK_BATCH, on_verified=None) -> FetchResult:
        """Fetch the pieces covering `n_tokens` (default: what `found` matched), verify, store.

        `on_verified(index, data)` hears each newly fetched piece once, verified, from a store writer
        thread (kvnet.p2p.fetcher.Fetch); pieces already stored are not fetched, so not heard.

        `bulk` is the bulk mode asked of providers ("tls", or "tcp" for public artifacts), or None
        for libp2p `pieces` streams only; `bulk_batch` the most pieces one bulk grant asks for (a
        paying fetch pays with each request, so smaller grants pay more often). Returns as soon as
        the pieces are durable. A node that announces schedules the announcement of what it now
        holds in its background; a fetch-only node (`announce=False`) announces nothing.

        When the providers fail it (they lied in their offers, were dropped, vanished), the fetch goes
        on with the reserves left out for their price, then looks the manifest up again, at most
        MAX_RELOOKUPS times, without the providers that failed it (`_relookup`); every verified piece
        stays stored, so each attempt asks only for what is still missing. Each failed attempt is
        settled (its verified pieces paid); the result counts every attempt's pieces, bytes and
        providers, and `last_paid` what every attempt paid (set on failure too).
        """
        sm = found.signed
        record = await proofs.before_fetch(self, sm)  # RefusedError; else the /kvf/ record, if any
        needed = proofs.needed_pieces(list(sm.manifest.pieces_for_tokens(n_tokens or found.n_tokens)), record)
        self.last_paid = {}
        # spending limits and provider choice (price, score, speed), before any byte moves
        pay = self.payer.start(sm, found.providers, sum(sm.manifest.piece_len(i) for i in needed), self.scores)
        await self.runner.call(self.store.put_manifest, sm.raw)
        providers = pay.providers
        earlier: list[Provider] = []  # the providers of the failed attempts (their counters say what they did)
        offset = 0  # pieces the failed attempts stored: progress counts on from them

        def progress(done: int, total: int) -> None:
            on_piece(offset + done, offset + total)

        relookups, t0 = 0, trio.current_time()
        try:
            while True:
                try:
                    result = await fetch_pieces(sm, needed, providers, self.runner, self._open, self.scores,
                                                background=self._background, window=window, batch=batch,
                                                timeout=self.timeout, on_piece=progress if on_piece else None,
                                                bulk=bulk, bulk_batch=bulk_batch, payments=pay,
                                                on_verified=on_verified)
                    break
                except FetchError as exc:
                    await pay.settle(self._open, self.timeout)  # pay for what did verify
                    earlier += providers
                    offset = sum(p.pieces for p in earlier)
                    providers = pay.use_reserves()  # the pricier providers left out: the rest from them
                    if providers:
                        # what did verify stays stored: fetch_pieces asks the reserves for the rest only
                        log.info("fetch of %s from its cheapest providers failed (%s); the rest from %d "
                                 "pricier ones", sm.id.hex()[:16], _cause(exc), len(providers))
                        continue
                    if relookups >= MAX_RELOOKUPS:
                        raise
                    relookups += 1
                    providers = await self._relookup(sm, needed, earlier, pay, exc, relookups)
                    if not providers:
                        raise
            await pay.settle(self._open, self.timeout)
        finally:
            self.last_paid = pay.totals()  # every attempt's payments, also when the fetch failed
        self.payer.observed(result)  # speeds from the attempt that finished (re-lookups are not transfer time)
        if earlier:
            result = _merged(result, earlier, trio.current_time() - t0)
        await proofs.after_fetch(self, sm, record)  # a proof that verifies refuses it (RefusedError)
        if self.announcing and self._background is not None:
            self._background.start_soon(self._announce_in_background)
        return result

    async def _relookup(self, sm: SignedManifest, needed: list[int], failed_by: list[Provider],
                        pay: billing.FetchPayments, why: FetchError, n: int) -> list[Provider]:
        """Look `sm` up again after its providers failed a fetch (`why`); the new providers, joined to
        the fetch's payments, or [] when the lookup found none that holds a missing piece.

        Providers that failed it (dropped for a lie or a stall, or answered `missing` for pieces their
        offer claimed) are not asked; the lookup goes on until an offer from another, un-avoided peer
        holds a piece still missing. A provider dropped only as unreachable (NOT_A_LIE) may
        offer again: py-libp2p can fail to open a stream on a connection that has just answered.
        The new providers go through the spending limits and provider choice like the first ones (the
        ledger already holds what the failed attempts paid, so the daily limits count it); the load's
        license, if any, was signed once and is shown to them, not paid again.
        """
        have = await self.runner.call(self.store.present_pieces, sm.id)
        missing = set(needed) - set(have)
        failed = {p.peer for p in failed_by if p.missing or p.dropped not in (None, *NOT_A_LIE)}
        log.info("fetch of %s failed (%s): looking it up again (%d of %d), %d pieces missing, without the %d "
                 "provider(s) that failed it", sm.id.hex()[:16], _cause(why), n, MAX_RELOOKUPS, len(missing),
                 len(failed))
        offers, _ = await self._verified_offers(sm.id, lambda o: o.signed.id == sm.id, skip=failed,
                                                useful=lambda o: bool(o.have & missing))
        fresh = [o.provider() for o in offers if o.peer not in failed and o.have & missing]
        if not fresh:
            log.info("re-lookup %d of %s found no other provider of its %d missing pieces", n, sm.id.hex()[:16],
                     len(missing))
            return []
        try:
            more = self.payer.start(sm, fresh, sum(sm.manifest.piece_len(i) for i in missing), self.scores)
        except SpendingLimitError as exc:
            log.info("re-lookup %d of %s: its %d provider(s) are beyond the spending limits: %s", n,
                     sm.id.hex()[:16], len(fresh), exc)
            raise FetchError(f"{why}; a re-lookup found {len(fresh)} provider(s) beyond the spending limits "
                             f"({exc})") from exc
        # join them to this fetch's payments through its reserves (use_reserves opens their accounts);
        # the pricier ones the choice left out become the fetch's reserves again
        pay.reserves = list(more.providers)
        chosen = pay.use_reserves()
        pay.reserves = list(more.reserves)
        log.info("re-lookup %d of %s: %d new provider(s) for the %d missing pieces", n, sm.id.hex()[:16],
                 len(chosen), len(missing))
        return chosen

    async def collect_receipts(self, peer: str) -> int:
        """As a publisher: collect the license receipts `peer` (a host) keeps for us into our ledger
        (`/kvnet/receipts/1.0.0`); how many were new. A host refusing raises WireError (`forbidden`)."""
        return await billing.collect(self._open, peer, self.ledger, self.timeout)

    async def _announce_in_background(self) -> None:
        try:
            await self.announce_new()
        except Exception as exc:  # noqa: BLE001 - the store watcher retries
            log.info("announcing a fetched artifact failed: %s", _cause(exc))


def _listen_ip(addr: str) -> str:
    """The IP of a listen multiaddr (/ip4/<ip>/tcp/<port> or /ip6/...); the bulk listener binds it."""
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return "0.0.0.0"


def _merged(last: FetchResult, earlier: list[Provider], seconds: float) -> FetchResult:
    """The result of a fetch that took several attempts: the last attempt's result plus what the
    failed ones stored (their providers' counters), so `fetched`, `bytes` and `providers` describe the
    whole load (a provider in two attempts is summed; its last `dropped` counts)."""
    stats: dict[str, dict] = {}
    for p in earlier:
        st = stats.setdefault(p.peer, {"pieces": 0, "bytes": 0, "dropped": None})
        st["pieces"] += p.pieces
        st["bytes"] += p.bytes
        st["dropped"] = p.dropped
    for peer, st in last.providers.items():
        old = stats.get(peer, {"pieces": 0, "bytes": 0})
        stats[peer] = {**st, "pieces": old["pieces"] + st["pieces"], "bytes": old["bytes"] + st["bytes"]}
    fetched = sum(p.pieces for p in earlier)
    return dataclasses.replace(
        last, fetched=last.fetched + fetched, already_had=max(0, last.already_had - fetched),
        bytes=last.bytes + sum(p.bytes for p in earlier), seconds=seconds, providers=stats,
        received_bytes=last.received_bytes + sum(p.received for p in earlier),
        paths={**{p.peer: p.path for p in earlier}, **last.paths})


def _prompt_matches(m, i: int, tokens: list[int], keys: list[chain.ChainKey]) -> list[int]:
    """Token counts, ascending from chain index i, at which the prompt and manifest `m` share the key.

    `keys` are the prompt's own chain keys. A document whose last block is partial shares it only if
    the prompt contains the whole tail (the prompt's key over the same token count is equal).
    """
    counts = [m.boundary(i)]
    j = i + 1
    while j < len(m.chain) and j < len(keys) and keys[j].key == m.chain[j] and keys[j].n_tokens == m.boundary(j):
        counts.append(m.boundary(j))
        j += 1
    last = len(m.chain) - 1
    if (j == last and m.n_tokens % m.block_size and m.n_tokens <= len(tokens)
            and chain.key_at(m.model_id, tokens, m.n_tokens, m.block_size) == m.chain[last]):
        counts.append(m.n_tokens)
    return counts


def _holds_key(o: Offer, key: bytes, n: int) -> bool:
    """Does the offered (signed, verified) manifest hold `key` as its chain key at `n` tokens?"""
    m = o.signed.manifest
    i = n // m.block_size - 1
    return 0 <= i < len(m.chain) and m.chain[i] == key and m.boundary(i) == n


def _best_for_prefix(offers: list[Offer], key: bytes, n: int, tokens: list[int], queries: int) -> Found | None:
    """Pick the manifest covering the most prompt tokens that its offering peers can supply.

    Offers that do not contain `key` at boundary `n` are ignored (a peer answering for another key).
    The match is extended from `n` along the signed chain, then cut back to the longest prefix whose
    pieces the offering peers together hold, so the fetch asks only for what exists.
    """
    by_id: dict[bytes, list[Offer]] = {}
    for o in offers:
        if _holds_key(o, key, n):
            by_id.setdefault(o.signed.id, []).append(o)
    best: tuple[int, bytes] | None = None
    prompt_keys: dict[int, list[chain.ChainKey]] = {}
    for mid, group in by_id.items():
        m = group[0].signed.manifest
        keys = prompt_keys.setdefault(m.block_size, chain.chain_keys(m.model_id, tokens, m.block_size))
        held = set().union(*(o.have for o in group))
        counts = _prompt_matches(m, n // m.block_size - 1, tokens, keys)
        supplied = [c for c in counts if all(p in held for p in m.pieces_for_tokens(c))]
        covered = max(supplied, default=n)
        if best is None or covered > best[0]:
            best = (covered, mid)
    if best is None:
        return None
    chosen = by_id[best[1]]
    providers = [o.provider() for o in chosen]
    return Found(chosen[0].signed, best[0], providers, queries, chosen)
