"""Prometheus metrics of a kvnet-node, served by prometheus-client on a loopback address.

Its own registry (not the process-global default), so tests and embedders can run several nodes in
one process. Counters are bumped by the service as things happen; gauges that need the store or the
host (peers, store bytes, bytes served) are refreshed by `Metrics.refresh` from the node's trio loop,
so the metrics thread never touches the store's SQLite connection. docs/agent-api.md lists the names.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

# ledger role -> the `direction` label of kvnet_receipts_total
DIRECTIONS = {"out": "signed", "in": "accepted", "held": "held"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes_fetched = Counter("kvnet_fetched_bytes", "KV piece bytes fetched from peers and verified",
                                     registry=r)
        self.bytes_served = Gauge("kvnet_served_bytes", "KV piece bytes served to peers (streams and bulk)",
                                  registry=r)
        self.pieces_verified = Counter("kvnet_pieces_verified", "fetched pieces that verified", registry=r)
        self.providers_dropped = Counter("kvnet_providers_dropped", "providers dropped during fetches "
                                         "(bad pieces, timeouts)", registry=r)
        self.cached_tokens = Counter("kvnet_cached_tokens", "prompt tokens answered from stored KV", registry=r)
        self.prompt_tokens = Counter("kvnet_prompt_tokens", "prompt tokens of agent requests", registry=r)
        self.completion_tokens = Counter("kvnet_completion_tokens", "tokens generated for agents", registry=r)
        self.prefill_saved = Counter("kvnet_prefill_saved_seconds", "estimated prefill seconds saved by reuse",
                                     registry=r)
        self.requests = Counter("kvnet_requests", "agent requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("kvnet_request_seconds", "agent request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("kvnet_generation_queue", "generations queued or running", registry=r)
        self.peers = Gauge("kvnet_peers", "connected libp2p peers", registry=r)
        self.store_bytes = Gauge("kvnet_store_bytes", "bytes of KV held in the store", registry=r)
        self.audits = Counter("kvnet_audits", "block audits of loaded artifacts by result (passed, failed, "
                              "error)", ["result"], registry=r)
        self.server: Any = None
        self.address: str | None = None

    def watch_ledger(self, ledger: Any) -> None:
        """Export the payment counters from `ledger` (kvnet.ledger.Ledger), read at each scrape."""
        self.registry.register(LedgerCollector(ledger))

    def serve(self, address: str) -> str:
        """Start the HTTP exporter on `address` ("host:port"; port 0 picks one); returns the bound address."""
        host, _, port = address.rpartition(":")
        self.server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        bound = self.server.server_address
        self.address = f"{host}:{bound[1]}"
        return self.address

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class LedgerCollector:
    """Payment counters read from the node's ledger when Prometheus scrapes (the ledger is the truth,
    so they count every receipt it holds and survive restarts; its connection is lock-protected for
    calls from any thread). `kvnet_receipts_total{direction}`: receipts signed by this node (`signed`),
    accepted as their payee (`accepted`), accepted and kept for a publisher (`held`);
    `kvnet_paid_microunits_total{currency}` / `kvnet_earned_microunits_total{currency}`: what the
    signed / accepted receipts added."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def collect(self) -> Any:
        receipts = CounterMetricFamily("kvnet_receipts", "payment receipts in the ledger: signed by this node, "
                                       "accepted as payee, held for a publisher", labels=["direction"])
        paid = CounterMetricFamily("kvnet_paid_microunits", "micro-units this node signed receipts for",
                                   labels=["currency"])
        earned = CounterMetricFamily("kvnet_earned_microunits", "micro-units of receipts this node accepted "
                                     "as payee", labels=["currency"])
        counts = dict.fromkeys(DIRECTIONS.values(), 0)
        for t in self.ledger.totals():
            counts[DIRECTIONS[t["role"]]] += t["receipts"]
            if t["role"] == "out":
                paid.add_metric([t["currency"]], t["amount"])
            elif t["role"] == "in":
                earned.add_metric([t["currency"]], t["amount"])
        for direction, n in counts.items():
            receipts.add_metric([direction], n)
        yield from (receipts, paid, earned)
