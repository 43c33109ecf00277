"""kvnet-node's audit policy (docs/audits.md, "The node policy"): every artifact the node loads is audited
on its first load, in the background, and a fraud found is acted on.

`[audit] blocks = N` (default 1) random covered blocks plus always the last one are recomputed on the
BackgroundAuditor's own thread, reading pieces through its own read-only store: the request that
loaded the prefix never waits (its `kvnet.audit` says "queued"). A block that fails in the producer's
own compute profile yields a fraud proof, which this node acts on from the trio loop: the artifact is
refused (kvnet.refusals: removed, remembered, its publisher scored down) and the proof, signed by the
node key, is put in the DHT (kvnet.p2p.proofs). The node also verifies proofs it finds before using a
fetched artifact (`Node.proof_verifier`). Results: `GET /v1/status` (`audits`) and the
`kvnet_audits{result}` counter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import trio

from kvnet import fraud
from kvnet.audit import AuditReport, BackgroundAuditor
from kvnet.daemon.config import NodeConfig
from kvnet.daemon.metrics import Metrics
from kvnet.engine import Engine
from kvnet.p2p import proofs
from kvnet.p2p.node import Node
from kvnet.refusals import FILENAME, Refusals

__all__ = ["RECENT", "DaemonAudits"]

log = logging.getLogger("kvnet.daemon.audits")
RECENT = 8  # audit reports kept for /v1/status


class DaemonAudits:
    """The node's auditor, its counters, and the hooks that act on what it finds."""

    def __init__(self, cfg: NodeConfig, engine: Engine, node: Node, metrics: Metrics) -> None:
        self.enabled, self.blocks = cfg.audit.enabled, cfg.audit.blocks
        self.node, self.metrics = node, metrics
        node.refusals = Refusals(cfg.data_dir / FILENAME)  # persisted, shared with CLI runs on this home
        node.proofs_dir = cfg.data_dir / "proofs"
        root = node.store.root
        node.proof_verifier = lambda raw: fraud.verify_stored(raw, engine, root)
        self.counts = {"queued": 0, "passed": 0, "failed": 0, "errors": 0, "proofs": 0}
        self.recent: list[dict[str, Any]] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self.auditor = (BackgroundAuditor(engine, root, n_random=self.blocks, on_report=self._report,
                                          on_proof=self._proof) if self.enabled else None)

    def loaded(self, manifest_id: bytes, prompt: Sequence[int], after: threading.Event | None = None) -> str:
        """Called (from the trio loop) right after a prefix was loaded; returns at once with what was done:
        "queued", "audited before" (this node audits an artifact once), or "off". The audit starts once
        `after` is set (the answer's first token: BackgroundAuditor.loaded)."""
        if self.auditor is None:
            return "off"
        self._token = trio.lowlevel.current_trio_token()
        if not self.auditor.loaded(manifest_id, prompt, after):
            return "audited before"
        self.counts["queued"] += 1
        return "queued"

    def _report(self, report: AuditReport) -> None:  # the auditor's thread
        result = "passed" if report.passed else "failed"
        self.counts[result] += 1
        self.metrics.audits.labels(result).inc()
        self.recent = [report.to_json(), *self.recent][:RECENT]

    def _proof(self, raw: bytes) -> None:  # the auditor's thread: act from the trio loop, wait for it
        try:
            fraud.write_proof(self.node.proofs_dir, raw)  # re-put at every full announcement
        except OSError as exc:
            log.warning("cannot keep the fraud proof in %s: %s", self.node.proofs_dir, exc)
        if self._token is not None:
            trio.from_thread.run(proofs.act_on_own, self.node, raw, trio_token=self._token)
        self.counts["proofs"] += 1  # acted on: refused, and the record put (or the put failed, logged)

    def status(self) -> dict[str, Any]:
        errors = len(self.auditor.errors) if self.auditor else 0
        if errors > self.counts["errors"]:
            self.metrics.audits.labels("error").inc(errors - self.counts["errors"])
            self.counts["errors"] = errors
        return {"enabled": self.enabled, "blocks": self.blocks, **self.counts,
                "pending": self.auditor.pending if self.auditor else 0,
                "refused": [r.manifest_id.hex() for r in self.node.refusals.refused()],
                "recent": self.recent}

    def close(self) -> None:
        if self.auditor is not None:
            self.auditor.close()
