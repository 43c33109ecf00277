"""Reused KV must be as good as computing it: bitwise versus prefill-then-continue, and (fp32) every
token versus a one-shot prefill of document + suffix. Where kvnet is compared with kvnet, a reference
from plain transformers (tests/hf_reference.py) pins both sides, so a fault they share cannot pass."""

import pytest
import torch

from kvnet import exactness
from kvnet.engine import Generation
from kvnet.publish import publish_tokens
from kvnet.reuse import load_prefix
from tests.conftest import random_tokens
from tests.hf_reference import hf_greedy, hf_model, hf_prefill

LENGTHS = [1, 100, 256, 300, 513, 1030]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n", LENGTHS)
def test_stored_kv_is_bitwise_prefill(request, dtype, n, store, key):
    engine = request.getfixturevalue(f"tiny_{dtype}")
    doc, suffix = random_tokens(n, seed=n), random_tokens(7, seed=n + 1)
    pub = publish_tokens(engine, store, key, doc, piece_size=4096)  # small pieces: segments straddle them
    loaded = load_prefix(engine, store, pub.manifest_id)
    own = engine.prefill(doc)
    ref_k, ref_v = hf_prefill(hf_model(engine), doc)
    for a, b, r in zip(loaded.keys + loaded.values, own.keys + own.values, ref_k + ref_v, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(b, r)  # and prefill itself is transformers' own forward, bit for bit
    a = engine.generate_from(loaded, suffix, 24, return_logits=True)
    b = engine.generate_from(own, suffix, 24, return_logits=True)
    assert a.tokens == b.tokens
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
    c = engine.generate_from(None, doc + suffix, 24, return_logits=True)
    if dtype == "fp32":
        ref = hf_greedy(hf_model(engine), doc + suffix, 24)
        for got in (a, c):
            assert got.tokens == ref.tokens
            assert exactness.max_logit_diff(got, ref) < 1e-4
    # the random continuation is not degenerate (an exactness test on one repeated token means nothing)
    assert len(set(a.tokens)) > 1


def test_generate_from_never_mutates_the_callers_kv(tiny_fp32):
    doc = random_tokens(300, seed=3)
    kv = tiny_fp32.prefill(doc)
    before = [t.clone() for t in kv.keys + kv.values]
    g1 = tiny_fp32.generate_from(kv, [1, 2, 3], 8)
    g2 = tiny_fp32.generate_from(kv, [1, 2, 3], 8)
    assert g1.tokens == g2.tokens
    assert kv.n_tokens == 300
    assert all(torch.equal(x, y) for x, y in zip(before, kv.keys + kv.values, strict=True))


def test_pad_token_inside_a_document_is_not_padding(tiny_fp32):
    pad = tiny_fp32.tokenizer.pad_token_id
    doc = [pad] * 5 + random_tokens(50, seed=4) + [pad] * 3
    kv = tiny_fp32.prefill(doc)
    a = tiny_fp32.generate_from(kv, [10, 11], 8, return_logits=True)
    c = tiny_fp32.generate_from(None, doc + [10, 11], 8, return_logits=True)
    ref = hf_greedy(hf_model(tiny_fp32), doc + [10, 11], 8)  # explicit all-ones mask: pads are tokens
    for got in (a, c):
        assert got.tokens == ref.tokens
        assert exactness.max_logit_diff(got, ref) < 1e-4


def test_prefix_of_kv_continues_like_prefill_of_prefix(tiny_fp32):
    doc = random_tokens(400, seed=5)
    full = tiny_fp32.prefill(doc)
    part = tiny_fp32.prefill(doc[:137])
    a = tiny_fp32.generate_from(full.prefix(137), doc[137:140], 6, return_logits=True)
    b = tiny_fp32.generate_from(part, doc[137:140], 6, return_logits=True)
    assert a.tokens == b.tokens
    assert exactness.max_logit_diff(a, b) < 1e-5
    ref = hf_greedy(hf_model(tiny_fp32), doc[:140], 6)
    assert a.tokens == ref.tokens
    assert exactness.max_logit_diff(a, ref) < 1e-4


def test_logit_diff_and_matching_prefix_measure_what_they_say():
    """Every tolerance check here goes through these two: a max_logit_diff that returned 0 would make
    all of them pass vacuously."""
    def gen(tokens, rows):
        return Generation(tokens, [torch.tensor(r) for r in rows])

    a = gen([1, 2, 3], [[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
    b = gen([1, 5, 3], [[0.0, 1.25], [-0.5, 2.0], [9.0, 9.0]])
    assert exactness.matching_prefix(a.tokens, b.tokens) == 1
    assert exactness.matching_prefix([1, 2], [1, 2, 3]) == 2
    # steps 0 and 1 compared (step 1 chose differently, from the same history); step 2 saw other tokens
    assert exactness.max_logit_diff(a, b) == 0.5
    assert exactness.max_logit_diff(a, a) == 0.0
    assert exactness.max_logit_diff(a, gen([1, 2, 3], [[0.0, 1.0], [0.0, 2.0], [0.0, -1.0]])) == 4.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exactness_experiment_in_a_fresh_process(request, dtype):
    r = exactness.run("tiny", 300, 32, dtype)
    assert (r["tokens_match"], r["tokens_total"], r["max_logit_diff"]) == (32, 32, 0.0)
    assert r["kv_bitwise_equal"] is True
    if dtype == "fp32":
        assert r["oneshot_tokens_match"] == 32
        engine = request.getfixturevalue("tiny_fp32")  # and the tokens are transformers' own answer
        prompt = exactness.seeded_document(engine.tokenizer, 300) + engine.tokenizer.encode(exactness.SUFFIX_TEXT)
        assert r["tokens"] == hf_greedy(hf_model(engine), prompt, 32).tokens


def test_a_prefix_of_blocks_loads_from_the_first_pieces_alone(tiny_bf16, store, key):
    from kvnet import artifact

    doc = random_tokens(15 * 256, seed=8)
    pub = publish_tokens(tiny_bf16, store, key, doc, piece_size=16384)
    m = pub.signed.manifest
    read = []

    def reader(i):
        read.append(i)
        return store.read_piece(pub.manifest_id, i)

    kv = artifact.load_kv(m, tiny_bf16, reader, 2 * 256)
    assert kv.n_tokens == 512
    assert sorted(set(read)) == list(m.pieces_for_tokens(512))
    assert len(set(read)) == -(-(2 * 256 * m.bytes_per_token) // m.piece_size) < len(m.pieces) // 5
    full = tiny_bf16.prefill(doc).prefix(512)
    assert all(torch.equal(a, b) for a, b in zip(kv.keys + kv.values, full.keys + full.values, strict=True))
