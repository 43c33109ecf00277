"""A kvnet network node: a libp2p host + the kvnet DHT + the offer/pieces servers + the fetcher.

    node = Node(key, store)
    async with trio.open_nursery() as n:
        await n.start(node.run)
        hit = await node.find(model_id, prompt_tokens)      # DHT prefix lookup + offers
        await node.fetch(hit)                               # verified multi-provider fetch
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from kvnet import chain
from kvnet.manifest import ManifestError, SignedManifest, parse
from kvnet.p2p import dht as kdht
from kvnet.p2p import wire
from kvnet.p2p.fetcher import FetchResult, Provider, fetch_pieces
from kvnet.p2p.host import DEFAULT_LISTEN, make_host, parse_addrs, peer_info
from kvnet.p2p.scores import PeerScores
from kvnet.p2p.server import OFFER_PROTOCOL, PIECES_PROTOCOL, HostingTerms, PieceServer, StoreRunner
from kvnet.store import Store

log = logging.getLogger("kvnet.p2p.node")
PEER_ADDR_TTL = 3600
# py-libp2p's DHT server handles at most 12 requests at once and resets the rest (which then stall
# for 30 s), so announcements stay below that.
ANNOUNCE_CONCURRENCY = 8
GROWTH_CHECK_S = 2.0


@dataclass
class Offer:
    peer: str
    signed: SignedManifest
    have: set[int]


@dataclass
class Found:
    """Where to get the KV for the longest network-held prefix of a prompt."""

    signed: SignedManifest
    n_tokens: int  # prompt tokens this manifest covers
    providers: list[Provider]
    dht_queries: int = 0
    offers: list[Offer] = field(default_factory=list)


class Node:
    def __init__(self, key: Ed25519PrivateKey, store: Store, *, listen: list[str] | None = None,
                 bootstrap: list[str] | None = None, scores_path: Path | None = None,
                 terms: HostingTerms | None = None, republish_s: float = 3600.0, refresh_s: float = 60.0,
                 timeout: float = 10.0) -> None:
        self.key = key
        self.store = store
        self.runner = StoreRunner(store)
        self.listen = listen or [DEFAULT_LISTEN]
        self.bootstrap = bootstrap or []
        self.scores = PeerScores(scores_path)
        self.server = PieceServer(self.runner, terms, request_timeout=timeout)
        self.republish_s, self.refresh_s, self.timeout = republish_s, refresh_s, timeout
        self.host = make_host(key)
        self.dht = kdht.make_dht(self.host)
        self.peer_id: ID = self.host.get_id()
        self._background: trio.Nursery | None = None
        self._announced_at_size = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.host.run(listen_addrs=parse_addrs(self.listen)):
            self.host.set_stream_handler(OFFER_PROTOCOL, self.server.handle_offer)
            self.host.set_stream_handler(PIECES_PROTOCOL, self.server.handle_pieces)
            async with background_trio_service(self.dht), trio.open_nursery() as nursery:
                for addr in self.bootstrap:
                    await self.connect(addr)
                await self.announce_all()
                self._background = nursery
                nursery.start_soon(self._republish_loop)
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._reannounce_on_growth)
                task_status.started(self)
                await trio.sleep_forever()

    @property
    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    async def connect(self, addr: str) -> None:
        """Dial a peer and add it to the routing table (connecting alone does not fill it)."""
        info = peer_info(addr)
        with trio.fail_after(self.timeout):
            await self.host.connect(info)
        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEER_ADDR_TTL)
        await self.dht.add_peer(info.peer_id)
        with trio.move_on_after(self.timeout):
            await self.dht.refresh_routing_table()

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.refresh_s)
            with trio.move_on_after(self.timeout * 3):
                try:
                    await self.dht.refresh_routing_table()
                except Exception as exc:  # noqa: BLE001 - a failed refresh is retried next round
                    log.info("routing refresh failed: %r", exc)

    async def _reannounce_on_growth(self) -> None:
        """Announce again when the routing table has grown since the last announcement.

        A node that announced while it knew few peers (the first node of a network, say) stored its
        provider records at those few; once others join, the records belong at the new closest peers.
        """
        while True:
            await trio.sleep(GROWTH_CHECK_S)
            size = self.dht.routing_table.size()
            if size > self._announced_at_size:
                self._announced_at_size = size
                try:
                    await self.announce_all()
                except Exception as exc:  # noqa: BLE001 - retried on the next growth or republish
                    log.info("re-announce failed: %r", exc)

    # -- announcing -----------------------------------------------------------------------------

    async def announce(self, mid: bytes) -> None:
        """Provider records for the manifest id and every chain key; the manifest as a DHT value."""
        sm = await self.runner.call(self.store.get_manifest, mid)
        have = await self.runner.call(self.store.present_pieces, mid)
        if not have:
            return
        keys = [mid] + [k for i, k in enumerate(sm.manifest.chain) if self._covered(sm, i, have)]
        limiter = trio.CapacityLimiter(ANNOUNCE_CONCURRENCY)

        async def provide(k: bytes) -> None:
            async with limiter:
                with trio.move_on_after(self.timeout):
                    await self.dht.provider_store.provide(k)

        async with trio.open_nursery() as nursery:
            for k in keys:
                nursery.start_soon(provide, k)
        try:
            await self.dht.put_value(kdht.manifest_key(mid), sm.raw)
        except Exception as exc:  # noqa: BLE001 - an expired manifest is still served by offer
            log.info("manifest %s not put in the DHT: %r", mid.hex()[:16], exc)

    @staticmethod
    def _covered(sm: SignedManifest, i: int, have: set[int]) -> bool:
        """Announce chain key i only if we hold every piece of the prefix it names."""
        return all(p in have for p in sm.manifest.pieces_for_tokens(sm.manifest.boundary(i)))

    async def announce_all(self) -> None:
        """Announce everything held; what was evicted is simply no longer announced."""
        self._announced_at_size = max(self._announced_at_size, self.dht.routing_table.size())
        entries = await self.runner.call(self.store.entries)
        for e in entries:
            if e.present:
                await self.announce(e.id)

    async def _republish_loop(self) -> None:
        while True:
            await trio.sleep(self.republish_s)
            try:
                await self.announce_all()
            except Exception as exc:  # noqa: BLE001 - retried next round
                log.warning("republish failed: %r", exc)

    # -- finding --------------------------------------------------------------------------------

    async def offers(self, peer: ID, key: bytes) -> list[Offer]:
        """Ask `peer` what it holds for a chain key or manifest id. Lies are scored down."""
        who = peer.to_base58()
        try:
            with trio.fail_after(self.timeout):
                stream = await self.host.new_stream(peer, [OFFER_PROTOCOL])
                try:
                    await wire.write_frame(stream, {"v": wire.PROTOCOL_VERSION, "key": key, "receipt": None})
                    resp = await wire.read_frame(stream, wire.MAX_RESPONSE)
                finally:
                    await stream.close()
            out = []
            for o in wire.field(resp, "offers", list)[:8]:
                if not isinstance(o, dict):
                    raise wire.WireError("malformed", "offer must be a map")
                sm = parse(wire.field(o, "manifest", bytes))
                have = wire.from_bitfield(wire.field(o, "have", bytes), len(sm.manifest.pieces))
                out.append(Offer(who, sm, have))
            return out
        except (wire.WireError, ManifestError) as exc:
            self.scores.bad(who, "protocol")
            log.warning("bad offer from %s: %s", who, exc)
        except Exception as exc:  # noqa: BLE001 - unreachable or reset peers just offer nothing
            self.scores.bad(who, "unreachable")
            log.info("no offer from %s: %r", who, exc)
        return []

    async def find(self, model_id: bytes, tokens: list[int],
                   block_size: int = chain.DEFAULT_BLOCK_SIZE) -> Found | None:
        """The network's longest prefix of `tokens`: DHT prefix search, then offers from its providers."""
        hit = await kdht.find_longest_prefix(self.dht, model_id, tokens, block_size, self.peer_id)
        if hit is None:
            return None
        offers = await self._gather_offers(hit.providers, hit.key)
        return self._best(offers, hit.key, hit.n_tokens, tokens, hit.queries)

    async def find_manifest(self, manifest_id: bytes) -> Found | None:
        """Who holds (part of) this manifest, and which pieces each has."""
        providers = await kdht.find_provider_ids(self.dht, manifest_id, self.peer_id)
        offers = await self._gather_offers(providers, manifest_id)
        return self._best(offers, manifest_id, None, [], 1)

    async def _gather_offers(self, providers: dict, key: bytes) -> list[Offer]:
        for pid, info in providers.items():
            self.host.get_peerstore().add_addrs(pid, info.addrs, PEER_ADDR_TTL)
        offers: list[Offer] = []

        async def ask(pid: ID) -> None:
            offers.extend(await self.offers(pid, key))

        async with trio.open_nursery() as nursery:
            for pid in providers:
                nursery.start_soon(ask, pid)
        return offers

    @staticmethod
    def _best(offers: list[Offer], key: bytes, n: int | None, tokens: list[int], queries: int) -> Found | None:
        """Pick the manifest covering the most prompt tokens; group the peers that offer it."""
        best: tuple[int, bytes] | None = None
        by_id: dict[bytes, list[Offer]] = {}
        for o in offers:
            m = o.signed.manifest
            if n is None:  # asked by manifest id
                if o.signed.id != key:
                    continue
                covered = m.n_tokens
            else:
                i = n // m.block_size - 1
                if not (0 <= i < len(m.chain) and m.chain[i] == key and m.boundary(i) == n):
                    continue  # an offer that does not contain the prefix we asked for
                covered = n
                if m.n_tokens > n and m.n_tokens <= len(tokens) and \
                        chain.key_at(m.model_id, tokens, m.n_tokens, m.block_size) == m.chain[-1]:
                    covered = m.n_tokens  # the prompt also contains the document's partial tail
            by_id.setdefault(o.signed.id, []).append(o)
            if best is None or covered > best[0]:
                best = (covered, o.signed.id)
        if best is None:
            return None
        chosen = by_id[best[1]]
        providers = [Provider(o.peer, set(o.have)) for o in chosen]
        return Found(chosen[0].signed, best[0], providers, queries, chosen)

    # -- fetching -------------------------------------------------------------------------------

    async def _open(self, peer: str, protocol: str):
        return await self.host.new_stream(ID.from_base58(peer), [protocol])

    async def fetch(self, found: Found, n_tokens: int | None = None, *, on_piece=None, window: int = 4,
                    batch: int = 8) -> FetchResult:
        """Fetch the pieces covering `n_tokens` (default: what `found` matched), verify, store, announce."""
        sm = found.signed
        await self.runner.call(self.store.put_manifest, sm.raw)
        needed = list(sm.manifest.pieces_for_tokens(n_tokens or found.n_tokens))
        result = await fetch_pieces(sm, needed, found.providers, self.runner, self._open, self.scores,
                                    background=self._background, window=window, batch=batch,
                                    timeout=self.timeout, on_piece=on_piece)
        await self.announce(sm.id)
        return result
