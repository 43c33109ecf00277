"""What the agent socket's endpoints do: engine + store + network, shared by every request.

Threads: the model runs in the scheduler's worker (one at a time, `engine_limiter`, which publishing
shares); every store call goes through the node's `StoreRunner` (one thread, serialized), so the
store's SQLite connection is never used by two threads at once. Loading a stored prefix runs there
too. Network finds and fetches are trio tasks, concurrent with generation.

A request: tokenize -> longest local prefix -> if the network may have a longer one, find it and
fetch it (verified, into the store) -> load the prefix -> queue the generation (prefill of the
uncached rest, then greedy decoding in chunks) -> tokens stream back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import __version__, artifact, chain
from kvnet.daemon.chat import document_prefix
from kvnet.daemon.config import NodeConfig
from kvnet.daemon.metrics import Metrics
from kvnet.daemon.openai_api import ApiError, GenParams, bad
from kvnet.daemon.payments import LedgerPayments, PaymentHook
from kvnet.daemon.scheduler import Job, Scheduler
from kvnet.engine import KV, Engine
from kvnet.errors import KvnetError
from kvnet.ledger import SpendingLimitError
from kvnet.manifest import MAX_PIECE_SIZE, Terms
from kvnet.p2p.fetcher import FetchResult
from kvnet.p2p.node import Found, Node
from kvnet.publish import STORE_BATCH, find_existing
from kvnet.reuse import load_prefix, prefix_builder

log = logging.getLogger("kvnet.daemon")
LOOKUP_TIMEOUT_S = 15.0  # the most a request waits for the network's answer before prefilling locally
FETCH_TIMEOUT_S = 300.0
FETCH_ATTEMPTS = 2  # a failed fetch is retried once with a fresh lookup
WARMUP_TOKENS = 64
DEFAULT_FETCH_BYTES_PER_S = 50e6  # until this node has measured its own fetches


@dataclass
class Reuse:
    """Where a request's cached prefix came from (the response's `kvnet` object)."""

    kv: KV | None = None
    cached: int = 0
    manifest_id: bytes | None = None
    source: str | None = None  # "local" | "network"
    providers: list[str] = field(default_factory=list)
    bytes_fetched: int = 0
    lookup_s: float = 0.0
    fetch_s: float = 0.0
    load_s: float = 0.0
    network_error: str | None = None
    load_error: str | None = None  # the stored prefix failed verification when loaded (then prefilled)
    price_paid: int = 0
    audit: str | None = None  # what loading started (kvnet.daemon.audits): "queued", "audited before", "off"
    # the KV a network fetch built from its pieces as they verified (loaded from it, not from the disk)
    built: artifact.KVBuilder | None = field(default=None, repr=False)
    # set at the answer's first token (or its end): the audit of a first load starts then, not before
    answered: threading.Event = field(default_factory=threading.Event, repr=False)


class Generation:
    """Greedy decoding state of one request, advanced by the scheduler in chunks (worker thread)."""

    def __init__(self, engine: Engine, kv: KV | None, suffix: list[int], max_new: int, stop_at_eos: bool,
                 first_token: threading.Event | None = None) -> None:
        """`first_token` is set once the first token is out (the prefill is done)."""
        self.engine, self.kv, self.next = engine, kv, suffix
        self.left, self.stop_at_eos, self.first_token = max_new, stop_at_eos, first_token
        self.tokens: list[int] = []
        self.prefill_s: float | None = None  # uncached rest + first token: the time to first token
        self.finish = "length"

    def advance(self, n: int) -> tuple[list[int], bool]:
        t0 = time.perf_counter()
        k = 1 if self.prefill_s is None else min(n, self.left)
        g = self.engine.generate_from(self.kv, self.next, k, stop_at_eos=self.stop_at_eos)
        if self.prefill_s is None:
            self.prefill_s = time.perf_counter() - t0
            if self.first_token is not None:
                self.first_token.set()
        self.tokens += g.tokens
        self.left -= len(g.tokens)
        self.kv, self.next = g.kv, g.tokens[-1:]
        eos = self.stop_at_eos and g.tokens[-1] == self.engine.tokenizer.eos_token_id
        if eos:
            self.finish = "stop"
        done = eos or self.left <= 0
        if done:
            self.kv = None  # free the cache now, not when the response is gone
        return g.tokens, done


@dataclass
class Run:
    job: Job
    gen: Generation
    reuse: Reuse
    prompt_tokens: int
    started: float


class Service:
    def __init__(self, cfg: NodeConfig, engine: Engine, node: Node, key: Ed25519PrivateKey,
                 metrics: Metrics, payments: PaymentHook | None = None) -> None:
        self.cfg, self.engine, self.node, self.key, self.metrics = cfg, engine, node, key, metrics
        self.payments: PaymentHook = payments or LedgerPayments(node)
        self._fetching: dict[bytes, trio.Lock] = {}  # one fetch per manifest at a time: nothing paid twice
        self.store, self.runner = node.store, node.runner
        self.engine_limiter = trio.CapacityLimiter(1)
        self.scheduler = Scheduler(cfg.agent.queue_size, cfg.agent.chunk_tokens, self.engine_limiter,
                                   metrics.queue.set)
        self.models = (cfg.model.ref,)
        self.context_len = int(engine.model.config.max_position_embeddings)
        self.prefill_s_per_token = 0.0
        self.fetch_bytes_per_s = DEFAULT_FETCH_BYTES_PER_S
        self.fetches: dict[str, dict[str, Any]] = {}  # in progress, by manifest id hex
        self.recent_fetches: list[dict[str, Any]] = []
        self.started = time.time()
        self.nursery: trio.Nursery | None = None
        from kvnet.daemon.audits import DaemonAudits  # audits and fraud proofs (docs/audits.md)

        self.audits = DaemonAudits(cfg, engine, node, metrics)

    # -- start ----------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """One small prefill before the socket accepts: the first request pays no lazy init, and the
        measured seconds per token give the estimates of prefill time saved (refined by publishes)."""
        tokens = [i % 256 for i in range(WARMUP_TOKENS)]
        self.engine.prefill(tokens)
        t0 = time.perf_counter()
        self.engine.prefill(tokens)
        self.prefill_s_per_token = (time.perf_counter() - t0) / len(tokens)

    def _note_prefill(self, seconds: float, n: int) -> None:
        if n >= WARMUP_TOKENS:
            self.prefill_s_per_token = 0.5 * self.prefill_s_per_token + 0.5 * seconds / n

    # -- the network side -----------------------------------------------------------------------

    def has_peers(self) -> bool:
        return bool(self.node.host.get_connected_peers()) or self.node.dht.routing_table.size() > 0

    async def fetch_found(self, found: Found, n_tokens: int, on_paid: Callable[[int], None] | None = None,
                          builder: artifact.KVBuilder | None = None) -> tuple[FetchResult, int]:
        """Fetch (verified, into the store) with progress in `fetches`; metrics and throughput noted.
        Returns the result and the price paid (the payment hook's say, from the ledger: every attempt
        of the node's fetch, re-lookups included). Fetches of one manifest run one at a time: a second
        agent waits and finds the pieces stored (no byte is fetched or paid for twice), and the
        ledger's receipts since the hook's mark are this fetch's. `on_paid` hears the price paid
        whether the fetch succeeds or fails (a failed fetch paid for the pieces that verified).
        `builder` takes each fetched piece as it verifies (kvnet.artifact.KVBuilder)."""
        lock = self._fetching.setdefault(found.signed.id, trio.Lock())
        try:
            async with lock:
                return await self._fetch_found(found, n_tokens, on_paid, builder)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._fetching.pop(found.signed.id, None)

    async def _paid_since(self, found: Found, result: FetchResult | None, mark: int, entry: dict[str, Any],
                          on_paid: Callable[[int], None] | None) -> int:
        """The price paid since `mark` (also after a failure or a cancellation), noted in `entry`."""
        paid = 0
        with trio.CancelScope(shield=True):
            try:
                paid = await self.payments.after_fetch(found, result, mark)
            except Exception as exc:  # noqa: BLE001 - the ledger says it later (GET /v1/ledger)
                log.info("reading the price paid for %s failed: %s", found.signed.id.hex()[:16], exc)
        entry["price_paid"] = paid
        if on_paid is not None:
            on_paid(paid)
        return paid

    async def _fetch_found(self, found: Found, n_tokens: int, on_paid: Callable[[int], None] | None,
                           builder: artifact.KVBuilder | None) -> tuple[FetchResult, int]:
        mark = await self.payments.before_fetch(found, n_tokens)  # SpendingLimitError: no byte moved
        mid = found.signed.id.hex()
        entry = {"manifest_id": mid, "n_tokens": n_tokens, "pieces_done": 0, "pieces_total": None,
                 "providers": [p.peer for p in found.providers], "started": time.time(), "error": None}
        self.fetches[mid] = entry

        def on_piece(done: int, total: int) -> None:
            entry["pieces_done"], entry["pieces_total"] = done, total

        try:
            with trio.fail_after(FETCH_TIMEOUT_S):
                result = await self.node.fetch(found, n_tokens, on_piece=on_piece,
                                               on_verified=builder.add if builder is not None else None)
        except BaseException as exc:
            entry["error"] = str(exc) or type(exc).__name__
            await self._paid_since(found, None, mark, entry, on_paid)
            raise
        finally:
            self.fetches.pop(mid, None)
            entry["finished"] = time.time()
            self.recent_fetches = [entry, *self.recent_fetches][:8]
        # every provider the fetch asked, those its re-lookups found included
        entry["providers"] = list(dict.fromkeys([*entry["providers"], *result.providers]))
        entry.update(bytes=result.bytes, seconds=round(result.seconds, 4), fetched=result.fetched,
                     already_had=result.already_had)
        self.metrics.bytes_fetched.inc(result.bytes)
        self.metrics.pieces_verified.inc(result.fetched)
        self.metrics.providers_dropped.inc(sum(1 for s in result.providers.values() if s.get("dropped")))
        if result.bytes > 1 << 20 and result.seconds > 0:
            self.fetch_bytes_per_s = 0.5 * self.fetch_bytes_per_s + 0.5 * result.bytes / result.seconds
        return result, await self._paid_since(found, result, mark, entry, on_paid)

    async def _from_network(self, prompt: list[int], have: int, info: Reuse) -> None:
        """Find and fetch the network's longest prefix, if longer than `have`. The node's fetch itself
        looks the manifest up again when its providers fail it (Node.fetch, MAX_RELOOKUPS); a fetch
        that still fails is tried once more with a fresh prefix lookup (which may find another
        manifest, and no longer prefers the providers just scored down); then the node prefills
        locally. `info.price_paid` is what every attempt paid, the failed ones included."""

        def paid(amount: int) -> None:
            info.price_paid += amount

        for attempt in range(FETCH_ATTEMPTS):
            t0 = time.perf_counter()
            found = None
            try:
                with trio.move_on_after(LOOKUP_TIMEOUT_S) as lookup:
                    found = await self.node.find(self.engine.model_id, prompt)
                info.lookup_s += time.perf_counter() - t0
                if lookup.cancelled_caught:  # said, and tried again like a failed fetch
                    info.network_error = f"the network lookup did not finish within {LOOKUP_TIMEOUT_S:g} s"
                    log.info("network prefix lookup timed out (attempt %d of %d)", attempt + 1, FETCH_ATTEMPTS)
                    continue
                if found is None or found.n_tokens <= have:
                    log.info("the network holds no longer prefix (%d tokens held here; lookup %.2f s)", have,
                             time.perf_counter() - t0)
                    return
                t1 = time.perf_counter()
                builder = prefix_builder(self.engine, found.signed.manifest, found.n_tokens, len(prompt))
                result, _ = await self.fetch_found(found, found.n_tokens, on_paid=paid, builder=builder)
                info.fetch_s += time.perf_counter() - t1
                info.built = builder
                info.source, info.providers = "network", [p for p, s in result.providers.items() if s.get("pieces")]
                info.bytes_fetched = result.bytes
                info.network_error = None
                return
            except SpendingLimitError:  # the operator's limit: the agent hears it (402), nothing was fetched
                raise
            except Exception as exc:  # noqa: BLE001 - the network is an optimisation: answer from the store
                info.network_error = str(exc) or type(exc).__name__
                log.info("network prefix fetch failed (attempt %d of %d): %s", attempt + 1, FETCH_ATTEMPTS,
                         info.network_error)

    async def prepare(self, prompt: list[int]) -> Reuse:
        """The longest prefix of `prompt` held locally or, if longer, on the network; loaded and verified."""
        info = Reuse()
        usable = len(prompt) - 1  # the last prompt token is always computed: its logits pick the answer
        local = await self.runner.call(self.store.lookup, self.engine.model_id, prompt)
        have = min(local.n_tokens, usable) if local else 0
        if self.cfg.agent.use_network and have < usable and self.has_peers():
            await self._from_network(prompt, have, info)
            if info.source == "network":
                local = await self.runner.call(self.store.lookup, self.engine.model_id, prompt)
        fetched, info.built = info.built, None
        if local is None or min(local.n_tokens, usable) <= 0:
            return info
        info.cached, info.manifest_id = min(local.n_tokens, usable), local.manifest_id
        info.source = info.source or "local"
        t0 = time.perf_counter()
        try:  # from the KV the fetch built, if the lookup found the prefix it fetched (else from the store)
            info.kv = await self.runner.call(load_prefix, self.engine, self.store, local.manifest_id, info.cached,
                                             fetched)
        except KvnetError as exc:  # a stored piece rotted on disk: it fails verification, never loads
            log.warning("stored KV %s failed to load, prefilling instead: %s", local.manifest_id.hex()[:16], exc)
            return Reuse(network_error=info.network_error, load_error=str(exc))
        info.load_s = time.perf_counter() - t0
        # in the background, from the answer's first token on: never waited for, never slowing the answer
        info.audit = self.audits.loaded(local.manifest_id, prompt, after=info.answered)
        return info

    # -- generation -----------------------------------------------------------------------------

    def check_prompt(self, prompt: list[int], params: GenParams) -> None:
        where = "messages" if params.chat else "prompt"
        if not prompt:
            raise bad("the prompt is empty", where)
        vocab = int(self.engine.model.config.vocab_size)
        if any(not 0 <= t < vocab for t in prompt):
            raise bad(f"prompt token ids must be in [0, {vocab})", where)
        if len(prompt) + params.max_tokens > self.context_len:
            raise bad(f"this model's context is {self.context_len} tokens; the prompt has {len(prompt)} and "
                      f"max_tokens is {params.max_tokens}", where,
                      code="context_length_exceeded")

    async def start(self, prompt: list[int], params: GenParams) -> Run:
        """Find and load the prefix, then queue the generation (QueueFull when the queue is full)."""
        self.check_prompt(prompt, params)
        if self.scheduler.active >= self.scheduler.max_jobs:  # refuse before any fetch or load
            self.scheduler.stats.rejected += 1
            raise ApiError(503, f"the generation queue is full ({self.scheduler.max_jobs} queued or running); "
                           "retry later", "server_error", code="queue_full")
        t0 = time.perf_counter()
        reuse = await self.prepare(prompt) if params.reuse else Reuse()
        gen = Generation(self.engine, reuse.kv, prompt[reuse.cached:], params.max_tokens, not params.ignore_eos,
                         reuse.answered)
        reuse.kv = None  # the generation holds it now
        try:
            job = self.scheduler.submit(gen.advance)
        except BaseException:
            reuse.answered.set()  # no answer is coming: the audit need not wait for one
            raise
        return Run(job, gen, reuse, len(prompt), t0)

    def finished(self, run: Run) -> None:
        """Count a finished request in the metrics."""
        run.reuse.answered.set()  # also when it ended before its first token
        self.metrics.prompt_tokens.inc(run.prompt_tokens)
        self.metrics.completion_tokens.inc(len(run.gen.tokens))
        self.metrics.cached_tokens.inc(run.reuse.cached)
        saved = self.saved_s(run)
        if saved > 0:
            self.metrics.prefill_saved.inc(saved)
        if run.gen.prefill_s is not None and not run.reuse.cached:
            self._note_prefill(run.gen.prefill_s, run.prompt_tokens)

    def saved_s(self, run: Run) -> float:
        r = run.reuse
        return self.prefill_s_per_token * r.cached - r.load_s - r.fetch_s

    def kvnet_info(self, run: Run, ignored: list[str]) -> dict[str, Any]:
        r = run.reuse
        return {
            "manifest_id": r.manifest_id.hex() if r.manifest_id else None, "cached_tokens": r.cached,
            "source": r.source, "providers": r.providers, "bytes_fetched": r.bytes_fetched,
            "lookup_s": round(r.lookup_s, 4), "fetch_s": round(r.fetch_s, 4), "load_s": round(r.load_s, 4),
            "prefill_s": round(run.gen.prefill_s or 0.0, 4),
            "prefill_s_saved_estimate": round(self.saved_s(run), 4),
            "price_paid": r.price_paid, "currency": self.cfg.prices.currency,  # kvnet.daemon.payments
            "audit": r.audit,  # kvnet.daemon.audits
            "network_error": r.network_error, "load_error": r.load_error, "ignored_params": ignored,
            "token_ids": list(run.gen.tokens),
        }

    def text_of(self, tokens: list[int]) -> str:
        eos = self.engine.tokenizer.eos_token_id
        return self.engine.tokenizer.decode([t for t in tokens if t != eos])

    # -- publishing -----------------------------------------------------------------------------

    def _compute(self, tokens: list[int], terms: Terms, source: dict, ttl: int):
        t0 = time.perf_counter()
        kv = self.engine.prefill(tokens)
        prefill_s = time.perf_counter() - t0
        data = artifact.kv_to_bytes(kv, self.engine.layout, chain.DEFAULT_BLOCK_SIZE)
        del kv
        signed = artifact.build_manifest(self.engine, tokens, data, self.key, terms=terms, source=source,
                                         ttl_seconds=ttl)
        return signed, artifact.split_pieces(data, MAX_PIECE_SIZE), prefill_s

    async def publish(self, tokens: list[int], *, title: str | None, terms: Terms, ttl: int = 0,
                      source: dict | None = None) -> dict[str, Any]:
        """Prefill, sign and store `tokens` (or reuse this key's identical artifact), then announce."""
        if not tokens:
            raise bad("nothing to publish: the text has no tokens", "text")
        if len(tokens) > self.context_len:
            raise bad(f"the document has {len(tokens)} tokens; this model's context is {self.context_len}",
                      "text", code="context_length_exceeded")
        src = {"title": title or "untitled", **(source or {})}
        existing = await self.runner.call(find_existing, self.engine, self.store, self.key, tokens)
        if existing is not None:
            return self._published(existing, True, None)
        signed, pieces, prefill_s = await trio.to_thread.run_sync(self._compute, tokens, terms, src, ttl,
                                                                  limiter=self.engine_limiter)
        self._note_prefill(prefill_s, len(tokens))
        await self.runner.call(self.store.put_manifest, signed.raw)
        for start in range(0, len(pieces), STORE_BATCH):
            batch = [(i, pieces[i]) for i in range(start, min(start + STORE_BATCH, len(pieces)))]
            _, errors = await self.runner.call(self.store.put_pieces, signed.id, batch)
            if errors:
                raise next(iter(errors.values()))
        if self.nursery is not None:
            self.nursery.start_soon(self._announce)
        return self._published(signed, False, prefill_s)

    def _published(self, sm, reused: bool, prefill_s: float | None) -> dict[str, Any]:
        m = sm.manifest
        return {"manifest_id": sm.id.hex(), "already_published": reused, "n_tokens": m.n_tokens,
                "total_bytes": m.total_bytes, "pieces": len(m.pieces),
                "prefill_s": round(prefill_s, 4) if prefill_s is not None else None}

    async def _announce(self) -> None:
        try:
            await self.node.announce_new()
        except Exception as exc:  # noqa: BLE001 - the node's store watcher retries
            log.info("announcing a published artifact failed: %s", exc)

    async def publish_document_prefix(self, text: str) -> None:
        """`publish_on_miss`: publish the system turn a chat request carried, for the next agent."""
        try:
            await self.publish(document_prefix(self.engine.tokenizer, text), title="chat system prompt",
                               terms=Terms(0, self.cfg.prices.currency))
        except Exception as exc:  # noqa: BLE001 - an optimisation for others; the answer is already out
            log.info("publishing a chat document prefix failed: %s", exc)

    # -- lookups and listings -------------------------------------------------------------------

    async def lookup(self, prompt: list[int]) -> dict[str, Any]:
        local = await self.runner.call(self.store.lookup, self.engine.model_id, prompt)
        out: dict[str, Any] = {"prompt_tokens": len(prompt),
                               "local": {"manifest_id": local.manifest_id.hex(), "n_tokens": local.n_tokens}
                               if local else None, "network": None}
        if self.cfg.agent.use_network and self.has_peers():
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                found = await self.node.find(self.engine.model_id, prompt)
                if found is not None:
                    m = found.signed.manifest
                    need = len(m.pieces_for_tokens(found.n_tokens))
                    nbytes = min(m.total_bytes, need * m.piece_size)
                    out["network"] = {
                        "manifest_id": found.signed.id.hex(), "n_tokens": found.n_tokens,
                        "price_per_load": m.terms.price_per_load, "currency": m.terms.currency,
                        "offers": [{"peer": o.peer, "pieces_held": len(o.have)} for o in found.offers],
                        "bytes": nbytes, "est_fetch_s": round(nbytes / self.fetch_bytes_per_s, 4),
                        "est_prefill_s": round(found.n_tokens * self.prefill_s_per_token, 4)}
        return out

    async def fetch(self, *, manifest_id: bytes | None, prompt: list[int] | None) -> dict[str, Any]:
        if not self.has_peers():
            raise ApiError(409, "this node has no peers to fetch from (check bootstrap in node.toml)",
                           code="no_peers")
        found = None
        with trio.move_on_after(LOOKUP_TIMEOUT_S):
            found = (await self.node.find_manifest(manifest_id) if manifest_id is not None
                     else await self.node.find(self.engine.model_id, prompt or []))
        if found is None:
            raise ApiError(404, "nothing found on the network", code="not_found")
        n = found.signed.manifest.n_tokens if manifest_id is not None else found.n_tokens
        r, paid = await self.fetch_found(found, n)
        return {"manifest_id": found.signed.id.hex(), "n_tokens": n, "fetched": r.fetched, "price_paid": paid,
                "already_had": r.already_had, "bytes": r.bytes, "seconds": round(r.seconds, 4),
                "providers": {p: {"pieces": s["pieces"], "dropped": s["dropped"]} for p, s in r.providers.items()}}

    async def entries(self) -> list[dict[str, Any]]:
        return [{"manifest_id": e.id.hex(), "title": e.title, "model_id": e.model_id.hex(), "n_tokens": e.n_tokens,
                 "total_bytes": e.total_bytes, "pieces": e.n_pieces, "pieces_present": e.present,
                 "complete": e.complete, "pinned": e.pinned, "last_used": round(e.last_used, 3)}
                for e in await self.runner.call(self.store.entries)]

    def peers(self) -> list[dict[str, Any]]:
        out = []
        for pid in self.node.host.get_connected_peers():
            who = pid.to_base58()
            out.append({"peer_id": who, "score": self.node.scores.get(who),
                        "addrs": [str(a) for a in self.node.host.get_peerstore().addrs(pid)]})
        return out

    async def status(self) -> dict[str, Any]:
        s = self.scheduler.stats
        return {
            "version": __version__, "peer_id": self.node.peer_id.to_base58(), "addrs": self.node.addrs,
            "uptime_s": round(time.time() - self.started, 1),
            "model": {"ref": self.cfg.model.ref, "dtype": self.cfg.model.dtype,
                      "model_id": self.engine.model_id.hex(), "context_tokens": self.context_len},
            "queue": {"active": self.scheduler.active, "max": self.scheduler.max_jobs, "submitted": s.submitted,
                      "completed": s.completed, "cancelled": s.cancelled, "rejected": s.rejected,
                      "failed": s.failed, "chunk_tokens": self.scheduler.chunk},
            "fetches": list(self.fetches.values()), "recent_fetches": self.recent_fetches,
            "store": {"bytes": await self.runner.call(self.store.usage),
                      "capacity_bytes": self.store.capacity_bytes},
            "peers": len(self.node.host.get_connected_peers()),
            "routing_table": self.node.dht.routing_table.size(),
            "metrics": self.metrics.address,
            "estimates": {"prefill_s_per_token": self.prefill_s_per_token,
                          "fetch_bytes_per_s": self.fetch_bytes_per_s},
            "audits": self.audits.status(),
        }

    async def refresh_metrics(self) -> None:
        """Gauges that need the store or the host, refreshed from the trio loop."""
        while True:
            bulk = self.node.bulk.served_bytes if self.node.bulk is not None else 0
            self.metrics.bytes_served.set(self.node.server.served_bytes + bulk)
            self.metrics.peers.set(len(self.node.host.get_connected_peers()))
            try:
                self.metrics.store_bytes.set(await self.runner.call(self.store.usage))
            except Exception as exc:  # noqa: BLE001 - a gauge is not worth a crash
                log.debug("store usage for metrics failed: %s", exc)
            await trio.sleep(2.0)
