"""Block audits: is block j of an artifact really the KV of the tokens its chain keys name?

A signature proves who published an artifact, not what its bytes are. Block j's KV depends only on the
tokens of blocks 0..j and on the KV of blocks 0..j-1, so a consumer holding the prompt (it always does
for the blocks it reuses) recomputes block j on top of the artifact's *own* blocks 0..j-1 and compares
with the artifact's bytes of block j: one block of prefill attending to j blocks, not a full prefill.
The rule, the tolerances and what a sampled audit can and cannot catch are in docs/audits.md.

Why a tolerance even in the producer's profile: publishing prefills the whole document in one pass,
and a one-pass prefill rounds differently from "blocks 0..j-1, then block j" (other matmul and
attention shapes). Measured (docs/audits.md): on the 2-layer tiny model mostly bitwise equal; on the
28-layer qwen3-0.6b-shape in bf16 no block bitwise, rel up to 0.045 (fp32: bitwise with SDPA). A
block computed from another text is ~1x its own magnitude off (rel >= 1). So the verdict is
`exact` (bitwise), `rounding` (within the profile's tolerance) or `mismatch`; every figure is
reported, never only a boolean.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvnet import artifact, chain, models
from kvnet.engine import DTYPES, KV, Engine, KVLayout
from kvnet.errors import KvnetError
from kvnet.hashing import b3
from kvnet.manifest import Manifest, SignedManifest

__all__ = ["AuditError", "AuditReport", "BackgroundAuditor", "BlockAudit", "BlockMismatchError", "PromptMismatchError",
           "ROUNDING_TOLERANCE", "CROSS_PROFILE_TOLERANCE", "audit", "audit_block", "audit_block_from", "choose_blocks",
           "covered_blocks", "layer_hashes", "recompute_block", "tolerance"]

# Largest allowed relative difference, rel = max|artifact - recomputed| / max|recomputed|, taken per
# layer and per K/V of the block (then the max over them). From the measurements in docs/audits.md
# ("Tolerances", bench/audit_tolerance.py): bf16 up to 0.045 in the producer's profile (one-pass vs
# block-continued prefill) and 0.072 across profiles (sdpa vs eager, fp32 vs bf16) on
# qwen3-0.6b-shape; fp32 0 and 6.7e-6. The tolerances are about 3x those; a forged block measured
# rel >= 1. fp16 was not measured; it has more mantissa bits than bf16, so bf16's bounds are kept.
ROUNDING_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 2.0**-3, "bf16": 2.0**-3}
CROSS_PROFILE_TOLERANCE: dict[str, float] = {"fp32": 1e-3, "fp16": 2.0**-2, "bf16": 2.0**-2}

ReadPiece = Callable[[int], bytes | bytearray]
log = logging.getLogger("kvnet.audit")


class AuditError(KvnetError, ValueError):
    """An audit could not be run (no such block, pieces missing, another model, ...)."""


class PromptMismatchError(AuditError):
    """The prompt does not start with the tokens the artifact's chain keys commit to."""


class BlockMismatchError(AuditError):
    """An audited block is not the KV of its tokens (beyond the tolerance); `report` says which."""

    def __init__(self, message: str, report: AuditReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class BlockAudit:
    """The outcome of auditing one block, with every figure (max abs and relative difference)."""

    block: int
    start: int  # first token of the block
    end: int  # one past its last token
    same_profile: bool  # the auditor ran the producer's model id and compute profile
    bitwise: bool
    first_layer: int | None  # first layer whose K or V is not bitwise equal
    worst_layer: int
    max_abs: float
    rel: float
    tolerance: float
    recomputed: tuple[bytes, ...]  # BLAKE3 of the recomputed block's bytes, per layer (docs/audits.md)
    seconds: float

    @property
    def verdict(self) -> str:
        if self.bitwise:
            return "exact"
        return "rounding" if self.rel <= self.tolerance else "mismatch"

    @property
    def passed(self) -> bool:
        return self.verdict != "mismatch"

    def to_json(self) -> dict:
        return {"block": self.block, "tokens": [self.start, self.end], "verdict": self.verdict,
                "bitwise": self.bitwise, "first_layer": self.first_layer, "worst_layer": self.worst_layer,
                "max_abs": self.max_abs, "rel": self.rel, "tolerance": self.tolerance,
                "same_profile": self.same_profile, "seconds": round(self.seconds, 4)}


@dataclass
class AuditReport:
    """Every audited block of one artifact; `covered` blocks were auditable with the prompt given."""

    manifest_id: bytes
    covered: int
    total_blocks: int
    same_profile: bool
    producer_profile: dict[str, str]
    auditor_profile: dict[str, str]
    blocks: list[BlockAudit] = field(default_factory=list)

    @property
    def failed(self) -> list[BlockAudit]:
        return [b for b in self.blocks if not b.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def raise_for_failure(self) -> None:
        if self.failed:
            bad = ", ".join(f"{b.block} (rel {b.rel:.3g} > {b.tolerance:.3g})" for b in self.failed)
            raise BlockMismatchError(f"artifact {self.manifest_id.hex()[:16]}: blocks {bad} are not the KV of "
                                     "their tokens", self)

    def to_json(self) -> dict:
        return {"manifest_id": self.manifest_id.hex(), "ok": self.passed, "covered_blocks": self.covered,
                "total_blocks": self.total_blocks, "same_profile": self.same_profile,
                "producer_profile": self.producer_profile, "auditor_profile": self.auditor_profile,
                "blocks": [b.to_json() for b in self.blocks]}


def tolerance(m: Manifest, engine: Engine, same_profile: bool) -> float:
    """The allowed relative difference: the coarser of the artifact's and the auditor's dtype."""
    table = ROUNDING_TOLERANCE if same_profile else CROSS_PROFILE_TOLERANCE
    return max(table[m.dtype], table[engine.dtype])


def covered_blocks(m: Manifest, prompt: Sequence[int]) -> int:
    """How many of the artifact's blocks the prompt reproduces (its chain keys equal the manifest's).

    A block the prompt does not cover cannot be audited: its tokens are unknown to the auditor."""
    keys = chain.chain_keys(m.model_id, list(prompt[: m.n_tokens]), m.block_size)
    n = 0
    for mine, theirs in zip(keys, m.chain, strict=False):
        if mine.key != theirs or mine.n_tokens != m.boundary(n):
            break
        n += 1
    return n


def choose_blocks(covered: int, n_random: int, rng: random.Random | None = None) -> list[int]:
    """The last covered block (always: reuse depends on it, and it is the costliest to recompute) plus
    `n_random` other covered blocks drawn at random (fewer if there are not that many)."""
    if covered <= 0:
        return []
    rng = rng or random.Random()
    others = rng.sample(range(covered - 1), min(max(n_random, 0), covered - 1))
    return sorted({covered - 1, *others})


def same_profile(m: Manifest, engine: Engine) -> bool:
    return m.model_id == engine.model_id and dict(m.profile) == dict(engine.profile)


def _check_model(m: Manifest, engine: Engine) -> None:
    """The auditor must run the producer's model (weights, config, tokenizer); only dtype may differ."""
    if m.model_id == engine.model_id:
        return
    layout = (m.kv_shape[0], m.kv_shape[1], m.kv_shape[2])
    mine = (engine.layout.layers, engine.layout.kv_heads, engine.layout.head_dim)
    same = layout == mine and m.dtype in DTYPES and models.model_id(
        engine.resolved.folder, m.dtype, engine.tokenizer.identity()) == m.model_id
    if not same:
        raise AuditError(f"artifact was computed by model {m.model_id.hex()[:16]}..., this engine runs "
                         f"{engine.resolved.ref} ({engine.model_id.hex()[:16]}...): not the same model in any dtype")


def _load(m: Manifest, engine: Engine, read_piece: ReadPiece, n_tokens: int) -> KV:
    """The artifact's first n tokens in its own dtype (the auditor's dtype may differ: fp32 vs bf16)."""
    if m.model_id == engine.model_id:
        return artifact.load_kv(m, engine, read_piece, n_tokens)
    # same model in another dtype: decode with the artifact's own layout (load_kv reads only these fields)
    own = types.SimpleNamespace(model_id=m.model_id, resolved=engine.resolved, dtype=m.dtype,
                                layout=KVLayout(m.kv_shape[0], m.kv_shape[1], m.kv_shape[2], m.dtype))
    return artifact.load_kv(m, own, read_piece, n_tokens)  # type: ignore[arg-type]


def _cast(kv: KV, dtype: torch.dtype) -> KV:
    return KV([k.to(dtype) for k in kv.keys], [v.to(dtype) for v in kv.values])


def _block(kv: KV, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k[0, :, start:end], v[0, :, start:end]) for k, v in zip(kv.keys, kv.values, strict=True)]


def layer_hashes(block: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[bytes, ...]:
    """Per layer: BLAKE3(K || V) of the block, each [kv_heads, tokens, head_dim] in C order, little-endian:
    exactly the bytes the artifact layout holds for that layer of that block (docs/artifact.md)."""
    out = []
    for k, v in block:
        kb = k.contiguous().view(torch.uint8).numpy().tobytes()
        vb = v.contiguous().view(torch.uint8).numpy().tobytes()
        out.append(b3(kb, vb))
    return tuple(out)


def recompute_block(engine: Engine, m: Manifest, tokens: Sequence[int], j: int, read_piece: ReadPiece
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """(recomputed block j, the artifact's block j): block j's tokens prefilled on top of the artifact's
    own blocks 0..j-1, in the engine's dtype. The one computation both an auditor and a proof verifier
    run, so that within one profile they get the same bytes."""
    if not 0 <= j < len(m.chain):
        raise AuditError(f"block {j} out of range: the artifact has {len(m.chain)} blocks")
    start, end = j * m.block_size, m.boundary(j)
    if len(tokens) < end:
        raise PromptMismatchError(f"block {j} needs tokens 0..{end - 1}; {len(tokens)} given")
    _check_model(m, engine)
    kv = _load(m, engine, read_piece, end)
    want = DTYPES[engine.dtype]
    past = kv.prefix(start) if start else None
    if past is not None and past.keys[0].dtype != want:
        past = _cast(past, want)
    redone = engine.prefill(list(tokens[start:end]), kv=past)
    return _block(redone, start, end), _block(kv, start, end)


def _compare(redone, stored) -> tuple[bool, int | None, int, float, float]:
    """(bitwise, first differing layer, worst layer, max abs, max rel) over every layer's K and V."""
    first, worst, max_abs, rel = None, 0, 0.0, 0.0
    for layer, pair in enumerate(zip(redone, stored, strict=True)):
        for a, b in zip(*pair, strict=True):
            same = a.dtype == b.dtype and torch.equal(a, b)
            if not same and first is None:
                first = layer
            d = float((a.float() - b.float()).abs().max())
            scale = float(a.float().abs().max())
            r = d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))
            if r > rel:
                worst, rel = layer, r
            max_abs = max(max_abs, d)
    return first is None, first, worst, max_abs, rel


def audit_block(engine: Engine, m: Manifest, tokens: Sequence[int], j: int, read_piece: ReadPiece) -> BlockAudit:
    """Audit block j of the artifact described by `m`, whose pieces `read_piece(i)` returns."""
    t0 = time.perf_counter()
    redone, stored = recompute_block(engine, m, tokens, j, read_piece)
    return audit_block_from(engine, m, j, redone, stored, time.perf_counter() - t0)


def audit_block_from(engine: Engine, m: Manifest, j: int, redone: list[tuple[torch.Tensor, torch.Tensor]],
                     stored: list[tuple[torch.Tensor, torch.Tensor]], seconds: float) -> BlockAudit:
    """The verdict on block j from `recompute_block`'s two results (a proof verifier reuses them)."""
    bitwise, first, worst, max_abs, rel = _compare(redone, stored)
    same = same_profile(m, engine)
    return BlockAudit(j, j * m.block_size, m.boundary(j), same, bitwise, first, worst, max_abs, rel,
                      tolerance(m, engine, same), layer_hashes(redone), seconds)


def audit(engine: Engine, sm: SignedManifest, prompt: Sequence[int], read_piece: ReadPiece, *,
          blocks: Sequence[int] | None = None, n_random: int = 1, all_blocks: bool = False,
          rng: random.Random | None = None) -> AuditReport:
    """Audit an artifact against a prompt that starts with its document.

    Which blocks: `blocks` if given, every covered block with `all_blocks`, else `choose_blocks`
    (the last covered block plus random others, `n_random` in all). A forged block followed by honest
    ones passes an audit of the later blocks, so a sample catches a forgery only with probability
    (forged blocks) / (covered blocks) per block audited (docs/audits.md)."""
    m = sm.manifest
    covered = covered_blocks(m, prompt)
    if covered == 0:
        raise PromptMismatchError(f"the prompt does not start with block 0 of artifact {sm.id.hex()[:16]} "
                                  "(its chain keys differ): nothing can be audited")
    if blocks is not None:
        chosen = sorted(set(blocks))
        beyond = [j for j in chosen if not 0 <= j < covered]
        if beyond:
            raise PromptMismatchError(f"blocks {beyond} are not covered by the prompt (it covers blocks "
                                      f"0..{covered - 1} of {len(m.chain)})")
    elif all_blocks:
        chosen = list(range(covered))
    else:
        chosen = choose_blocks(covered, n_random, rng)
    report = AuditReport(sm.id, covered, len(m.chain), same_profile(m, engine), dict(m.profile),
                         dict(engine.profile))
    report.blocks = [audit_block(engine, m, prompt, j, read_piece) for j in chosen]
    return report


AUDIT_NICE = 10  # the audit worker's niceness: an answer running beside an audit gets the CPU first
AFTER_MAX_S = 120.0  # the longest an audit waits for its `after` event (an answer that never came)


def _lower_priority() -> None:
    """Lower this thread's scheduling priority to AUDIT_NICE (Linux: niceness is per thread, and the
    threads it starts, torch's intra-op pool for the audit's forward passes among them, inherit it).
    Why: on a node whose cores are all busy, a first load's audit ran at the answer's priority and
    slowed the very answer it was meant not to delay. A thread already nicer is left as it is; where it
    cannot be set, nothing changes."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < AUDIT_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, AUDIT_NICE)
    except (OSError, AttributeError):  # not Linux, or not allowed: the audit runs at normal priority
        pass


class BackgroundAuditor:
    """The node policy: on the first load of each artifact, audit `n_random` random covered blocks plus
    the last reused one, on one worker thread, so the answer that loaded it is not delayed.

    `loaded(signed, prompt)` queues the audit and returns at once; the worker reads the pieces through
    its own read-only store on `store_root` (never the caller's connection) and hands each report to
    `on_report`, and each fraud proof (a block that failed in the producer's own profile) to
    `on_proof(raw)`. An artifact is audited once per auditor, whatever its later loads. `drain()`
    waits for the queue (a CLI process calls it after printing its answer, before it exits)."""

    def __init__(self, engine: Engine, store_root: Path, *, n_random: int = 1,
                 on_report: Callable[[AuditReport], None] | None = None,
                 on_proof: Callable[[bytes], None] | None = None, rng: random.Random | None = None) -> None:
        self.engine, self.store_root, self.n_random = engine, Path(store_root), n_random
        self.on_report, self.on_proof, self.rng = on_report, on_proof, rng or random.Random()
        self.reports: list[AuditReport] = []
        self.errors: list[BaseException] = []
        self._seen: set[bytes] = set()
        self._busy = 0
        self._queue: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._worker = threading.Thread(target=self._run, name="kvnet-audit", daemon=True)
        self._worker.start()

    def loaded(self, signed: SignedManifest | bytes, prompt: Sequence[int],
               after: threading.Event | None = None) -> bool:
        """Queue an audit of `signed` (or of the stored manifest with this id: the worker reads it) against
        `prompt` if this is its first load; True if queued. Never waits for the audit. With `after`, the
        audit starts once it is set (at most AFTER_MAX_S later): a node sets it when the answer that
        loaded the prefix has its first token, so that the audit's forward passes, piece reads and
        Python work do not slow that answer (measured: +0.5 s on a 2-core node's first answer)."""
        mid = signed if isinstance(signed, bytes) else signed.id
        if mid in self._seen:
            return False
        self._seen.add(mid)
        self._queue.put((signed, list(prompt), after))
        return True

    @property
    def pending(self) -> int:
        """Audits queued or running (approximate: the queue also holds drain markers)."""
        return self._queue.qsize() + self._busy

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued audit is done; False if `timeout` ran out first."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Run what is queued (without waiting for answers any more), then stop the worker."""
        self._closing.set()
        self._queue.put(None)
        self._worker.join()

    def _wait(self, after: threading.Event) -> None:
        """Until `after` is set, the auditor closes, or AFTER_MAX_S have passed."""
        deadline = time.monotonic() + AFTER_MAX_S
        while not after.wait(0.1):
            if self._closing.is_set() or time.monotonic() > deadline:
                return

    def _run(self) -> None:
        from kvnet import fraud
        from kvnet.store import Store

        _lower_priority()
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            signed, prompt, after = item
            self._busy = 1
            if after is not None:
                self._wait(after)
            try:
                with Store(self.store_root, read_only=True) as store:
                    if isinstance(signed, bytes):
                        signed = store.get_manifest(signed)
                    report = audit(self.engine, signed, prompt,
                                   lambda i, s=store, m=signed.id: s.read_piece(m, i, verify=False),
                                   n_random=self.n_random, rng=self.rng)
                self.reports.append(report)
                if self.on_report:
                    self.on_report(report)
                for b in report.failed if report.same_profile else []:
                    log.warning("artifact %s block %d is not the KV of its tokens (rel %.3g)",
                                signed.id.hex()[:16], b.block, b.rel)
                    if self.on_proof:
                        self.on_proof(fraud.build_proof(signed, b, prompt))
            except Exception as exc:  # noqa: BLE001 - a failed audit must never take the answer down
                mid = signed if isinstance(signed, bytes) else signed.id
                log.warning("audit of %s failed: %s", mid.hex()[:16], exc)
                self.errors.append(exc)
            finally:
                self._busy = 0
