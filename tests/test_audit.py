"""Block audits on the tiny model: a correct artifact passes every block, a block computed from another
text is caught (by --all and by an audit of that block) and only it, and an audit in another compute
profile reports the difference it measured instead of a bare pass."""

from __future__ import annotations

import os
import random

import pytest

from kvnet import audit
from kvnet.engine import Engine, compute_profile
from kvnet.errors import KvnetError
from tests.conftest import random_tokens
from tests.poison import blockwise_artifact, honest_artifact, poisoned_artifact

B = 64
DOC = random_tokens(4 * B, seed=120)  # 4 blocks
OTHER = random_tokens(4 * B, seed=121)


def _reader(pieces):
    return lambda i: pieces[i]


@pytest.fixture(scope="module")
def tiny_eager() -> Engine:
    """The tiny model in another compute profile: the eager attention kernel instead of SDPA."""
    engine = Engine("tiny", "bf16")
    engine.model.set_attn_implementation("eager")
    engine.profile = compute_profile("eager")
    return engine


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_correct_artifact_passes_every_block(request, dtype, key):
    engine = request.getfixturevalue(f"tiny_{dtype}")
    sm, pieces = honest_artifact(engine, key, DOC, B)
    report = audit.audit(engine, sm, DOC + [1, 2, 3], _reader(pieces), all_blocks=True)
    assert [b.block for b in report.blocks] == [0, 1, 2, 3]
    assert report.same_profile and report.passed and report.failed == []
    for b in report.blocks:
        assert b.verdict in ("exact", "rounding")
        assert b.rel <= b.tolerance == audit.ROUNDING_TOLERANCE[dtype]
        assert (b.max_abs == 0.0) == b.bitwise == (b.first_layer is None)
    report.raise_for_failure()  # no error


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_an_artifact_computed_block_by_block_audits_bitwise(request, dtype, key):
    """The limit in docs/audits.md: the tolerance exists because publishing prefills in one pass; an
    artifact computed the way an audit recomputes it is `exact` in every block (partial tail too)."""
    engine = request.getfixturevalue(f"tiny_{dtype}")
    doc = random_tokens(5 * B + 9, seed=122)
    sm, pieces = blockwise_artifact(engine, key, doc, B)
    report = audit.audit(engine, sm, doc, _reader(pieces), all_blocks=True)
    assert [b.verdict for b in report.blocks] == ["exact"] * 6


def test_a_block_computed_from_another_text_is_caught_and_only_it(tiny_bf16, key):
    sm, pieces = poisoned_artifact(tiny_bf16, key, DOC, OTHER, forged=2, block_size=B)
    report = audit.audit(tiny_bf16, sm, DOC, _reader(pieces), all_blocks=True)
    assert [b.block for b in report.failed] == [2]
    bad = report.failed[0]
    assert bad.verdict == "mismatch" and bad.same_profile and not bad.bitwise and bad.first_layer == 0
    assert bad.rel > 4 * bad.tolerance  # measured ~1.7 (tolerance 0.125): far outside rounding
    # the block continued honestly on top of the forgery is exactly what an auditor recomputes
    assert report.blocks[3].verdict == "exact"
    with pytest.raises(audit.BlockMismatchError, match=r"blocks 2 \(rel") as err:
        report.raise_for_failure()
    assert isinstance(err.value, KvnetError) and err.value.report is report
    # an audit of block 2 alone catches it; an audit of block 3 alone does not (docs/audits.md)
    assert not audit.audit(tiny_bf16, sm, DOC, _reader(pieces), blocks=[2]).passed
    assert audit.audit(tiny_bf16, sm, DOC, _reader(pieces), blocks=[3]).passed


def test_the_first_block_forged_is_caught_too(tiny_bf16, key):
    sm, pieces = poisoned_artifact(tiny_bf16, key, DOC, OTHER, forged=0, block_size=B)
    report = audit.audit(tiny_bf16, sm, DOC, _reader(pieces), all_blocks=True)
    assert [b.block for b in report.failed] == [0]


def test_the_sample_always_holds_the_last_covered_block():
    rng = random.Random(5)
    assert audit.choose_blocks(4, 0, rng) == [3]
    for _ in range(20):
        chosen = audit.choose_blocks(4, 1, rng)
        assert len(chosen) == 2 and chosen[-1] == 3
    assert audit.choose_blocks(4, 10, rng) == [0, 1, 2, 3]
    assert audit.choose_blocks(0, 3, rng) == []
    seen = {tuple(audit.choose_blocks(10, 2, rng)) for _ in range(50)}
    assert len(seen) > 5  # really random


def test_only_blocks_the_prompt_covers_can_be_audited(tiny_bf16, key):
    sm, pieces = honest_artifact(tiny_bf16, key, DOC, B)
    prompt = DOC[: 2 * B + 10] + OTHER[:50]  # reproduces blocks 0 and 1 only
    assert audit.covered_blocks(sm.manifest, prompt) == 2
    report = audit.audit(tiny_bf16, sm, prompt, _reader(pieces), n_random=5)
    assert [b.block for b in report.blocks] == [0, 1]
    with pytest.raises(audit.PromptMismatchError, match=r"blocks \[3\] are not covered"):
        audit.audit(tiny_bf16, sm, prompt, _reader(pieces), blocks=[3])
    with pytest.raises(audit.PromptMismatchError, match="does not start with block 0"):
        audit.audit(tiny_bf16, sm, OTHER, _reader(pieces))


def test_a_partial_last_block_is_audited(tiny_bf16, key):
    doc = DOC[: 3 * B + 17]
    sm, pieces = honest_artifact(tiny_bf16, key, doc, B)
    report = audit.audit(tiny_bf16, sm, doc, _reader(pieces), blocks=[3])
    assert (report.blocks[0].start, report.blocks[0].end) == (3 * B, 3 * B + 17) and report.passed


def test_a_cross_profile_audit_reports_the_difference(tiny_bf16, tiny_fp32, tiny_eager, key):
    """Another attention kernel or another dtype: never bitwise, never silently passed: the figures are
    reported and judged against the cross-profile tolerance, and the forgery is still caught."""
    sm, pieces = honest_artifact(tiny_bf16, key, DOC, B)
    poisoned, ppieces = poisoned_artifact(tiny_bf16, key, DOC, OTHER, forged=2, block_size=B)
    for engine in (tiny_eager, tiny_fp32):
        report = audit.audit(engine, sm, DOC, _reader(pieces), all_blocks=True)
        assert not report.same_profile and report.passed
        assert report.producer_profile != report.auditor_profile or engine.dtype != "bf16"
        assert any(not b.bitwise for b in report.blocks)
        for b in report.blocks:
            assert b.tolerance == audit.CROSS_PROFILE_TOLERANCE["bf16"]
            assert b.verdict in ("exact", "rounding") and b.rel <= b.tolerance
        worst = max(report.blocks, key=lambda b: b.rel)
        assert worst.max_abs > 0 and 0 < worst.rel < 0.1  # measured ~0.017 on tiny
        assert report.to_json()["blocks"][worst.block]["rel"] == worst.rel
        bad = audit.audit(engine, poisoned, DOC, _reader(ppieces), all_blocks=True)
        assert [b.block for b in bad.failed] == [2]


def test_another_model_cannot_audit(key, tiny_bf16):
    sm, pieces = honest_artifact(tiny_bf16, key, DOC, B)
    from dataclasses import replace

    fake = replace(sm.manifest, model_id=bytes(32))
    with pytest.raises(audit.AuditError, match="not the same model"):
        audit.recompute_block(tiny_bf16, fake, DOC, 1, _reader(pieces))


def test_the_background_policy_audits_each_artifact_once_without_holding_the_caller(tiny_bf16, key, store):
    """`loaded` returns before the audit runs (the worker waits on an event set only after it returned),
    each artifact is audited on its first load only, and a forged block yields a fraud proof."""
    import threading

    from kvnet import fraud
    from tests.poison import put

    poisoned = put(store, *poisoned_artifact(tiny_bf16, key, DOC, OTHER, forged=2, block_size=B))
    honest = put(store, *honest_artifact(tiny_bf16, key, DOC[:200], B))
    returned = threading.Event()
    seen, proofs, nice = [], [], []
    base = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's niceness (Linux: per thread)

    def on_report(report):
        assert returned.wait(60)  # the caller got control back before any audit finished
        nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        seen.append(report)

    auditor = audit.BackgroundAuditor(tiny_bf16, store.root, n_random=3, on_report=on_report,
                                      on_proof=proofs.append)
    try:
        assert auditor.loaded(store.get_manifest(poisoned), DOC + [7, 8])
        returned.set()
        assert not auditor.loaded(store.get_manifest(poisoned), DOC)  # a second load: no second audit
        assert auditor.loaded(store.get_manifest(honest), DOC[:200])
        assert auditor.drain(120)
    finally:
        auditor.close()
    assert auditor.errors == []
    # the worker runs at lower priority than the answers beside it; the caller's thread is untouched
    assert nice == [max(base, audit.AUDIT_NICE)] * 2 and os.getpriority(os.PRIO_PROCESS, 0) == base
    assert [(r.manifest_id, r.passed) for r in seen] == [(poisoned, False), (honest, True)]
    assert [b.block for b in seen[0].blocks] == [0, 1, 2, 3]  # 3 random + the last covers all 4
    (raw,) = proofs
    assert fraud.verify_proof(raw, tiny_bf16, lambda i: store.read_piece(poisoned, i)).proof.block == 2


def test_an_audit_waits_for_its_answers_first_token_and_a_closing_auditor_does_not(tiny_bf16, key, store):
    """With `after`, the worker takes the audit but starts it only once the event is set (kvnet-node
    sets it at the answer's first token, so the audit never slows that answer); close() does not wait
    for an event that will never be set, and the queued audit still runs."""
    import threading
    import time

    from tests.poison import put

    first = put(store, *honest_artifact(tiny_bf16, key, DOC[:200], B))
    second = put(store, *honest_artifact(tiny_bf16, key, DOC[:300], B))
    seen = []
    auditor = audit.BackgroundAuditor(tiny_bf16, store.root, on_report=seen.append)
    answered, never = threading.Event(), threading.Event()
    try:
        assert auditor.loaded(first, DOC[:200], after=answered)
        deadline = time.monotonic() + 30
        while auditor._queue.qsize() and time.monotonic() < deadline:  # the worker took it and waits
            time.sleep(0.01)
        time.sleep(0.5)  # a tiny model's audit takes milliseconds: had it started, it would be done
        assert seen == [] and auditor.pending == 1
        answered.set()
        assert auditor.drain(60)
        assert [r.manifest_id for r in seen] == [first]
        assert auditor.loaded(second, DOC[:300], after=never)
        t0 = time.monotonic()
    finally:
        auditor.close()
    assert time.monotonic() - t0 < audit.AFTER_MAX_S / 4  # closing ends the wait
    assert [r.manifest_id for r in seen] == [first, second] and auditor.errors == []
