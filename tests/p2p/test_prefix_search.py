"""The prefix search over power-of-two chain-key boundaries: correct for every answer, few queries.

The DHT is replaced here by an oracle (which boundaries have providers) because this tests the search
algorithm alone; the real DHT path is covered by test_four_nodes and bench/dht_latency.py.
"""

import math

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from kvnet import chain, identity
from kvnet.manifest import Manifest, Terms
from kvnet.p2p import dht as kdht
from kvnet.p2p.node import Offer, _best_for_prefix

MODEL = bytes(32)
POW2 = [1, 2, 4, 8, 16, 32, 64]


def _search(tokens: list[int], provided: set[bytes]):
    """Run the search against an oracle; return the hit and the keys it asked about."""
    calls = []

    async def oracle(dht, key, exclude=None):
        calls.append(key)
        return {"peer": object()} if key in provided else {}

    orig = kdht.find_provider_ids
    kdht.find_provider_ids = oracle
    try:
        return trio.run(kdht.find_longest_prefix, None, MODEL, tokens, 4), calls
    finally:
        kdht.find_provider_ids = orig


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 70), data=st.data())
def test_finds_the_longest_provided_power_of_two_boundary(blocks, data):
    """Providers announce only 1, 2, 4, ... blocks; the search finds the longest one and asks only those."""
    held = data.draw(st.integers(0, blocks))  # the provider holds this many of the prompt's blocks
    tokens = list(range(blocks * 4 + 3))
    keys = [k.key for k in chain.chain_keys(MODEL, tokens, 4)][:blocks]
    provided = {keys[b - 1] for b in POW2 if b <= held}
    hit, calls = _search(tokens, provided)
    want = max((b for b in POW2 if b <= held), default=0)
    if want == 0:
        assert hit is None
    else:
        assert hit.n_tokens == want * 4 and hit.key == keys[want - 1]
    assert set(calls) <= {keys[b - 1] for b in POW2 if b <= blocks}  # never a non-announced key
    boundaries = sum(1 for b in POW2 if b <= blocks)
    assert len(calls) <= 4 * (math.ceil(math.log(boundaries + 1, 5)) + 1)


@pytest.mark.parametrize("blocks", [1, 15, 40])
def test_whole_document_hit_takes_one_round(blocks):
    tokens = list(range(blocks * 4))
    hit, calls = _search(tokens, {k.key for k in chain.chain_keys(MODEL, tokens, 4)})
    top = max(b for b in POW2 if b <= blocks)
    assert hit.n_tokens == top * 4 and len(calls) <= 4


def _manifest(n_tokens: int, block_size: int = 256, piece_tokens: int = 100) -> Manifest:
    n_pieces = -(-n_tokens // piece_tokens)
    chain_keys = tuple(i.to_bytes(2, "big") * 16 for i in range(-(-n_tokens // block_size)))
    return Manifest(model_id=MODEL, profile={}, dtype="bf16", kv_shape=(1, 1, 64), n_tokens=n_tokens,
                    block_size=block_size, chain=chain_keys,
                    piece_size=piece_tokens * 256, pieces=tuple(bytes(32) for _ in range(n_pieces)),
                    total_bytes=n_tokens * 256, publisher=bytes(32), terms=Terms(), created=1, expires=0, source={})


def test_a_640_block_artifact_announces_11_records():
    m = _manifest(640 * 256 + 17)  # 640 full blocks and a partial tail
    keys = kdht.announce_keys(m, b"M" * 32, set(range(len(m.pieces))))
    assert keys == [b"M" * 32] + [m.chain[b - 1] for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    assert m.chain[-1] not in keys  # the partial tail key is not announced


def test_a_partial_holder_announces_only_what_it_holds():
    m = _manifest(8 * 256)  # pieces of 100 tokens: blocks 1, 2, 4 need pieces 0-2, 0-5, 0-10
    assert kdht.announce_keys(m, b"M" * 32, set(range(6))) == [b"M" * 32, m.chain[0], m.chain[1]]
    assert kdht.announce_keys(m, b"M" * 32, {7}) == [b"M" * 32]  # something held: findable by id
    assert kdht.announce_keys(m, b"M" * 32, set()) == []


_KEY = Ed25519PrivateKey.from_private_bytes(bytes(32))


def _offer(m: Manifest, have: set[int], peer: str = "A") -> Offer:
    return Offer(peer, m.sign(_KEY), have)


def _doc_manifest(doc: list[int]) -> Manifest:
    """A signed-able manifest over `doc` with blocks of 4 tokens and one piece per block."""
    keys = tuple(k.key for k in chain.chain_keys(MODEL, doc, 4))
    n_pieces = -(-len(doc) // 4)
    return Manifest(model_id=MODEL, profile={}, dtype="bf16", kv_shape=(1, 1, 64), n_tokens=len(doc), block_size=4,
                    chain=keys, piece_size=4 * 256, pieces=tuple(bytes([i]) * 32 for i in range(n_pieces)),
                    total_bytes=len(doc) * 256, publisher=identity.public_bytes(_KEY), terms=Terms(), created=1,
                    expires=0, source={})


DOC = list(range(100, 122))  # 5 full blocks of 4 tokens and a 2-token tail: 6 pieces
KEY2 = chain.chain_keys(MODEL, DOC, 4)[1].key  # what the DHT search finds for prompts sharing 2-3 blocks


def test_offers_extend_the_hit_to_the_longest_common_prefix():
    m = _doc_manifest(DOC)
    everything = set(range(6))
    prompt = DOC[:12] + [7, 7, 7, 7, 7]  # shares 3 blocks; the search hit 2 (a power of two)
    assert _best_for_prefix([_offer(m, everything)], KEY2, 8, prompt, 1).n_tokens == 12
    # the whole document, partial tail included, when the prompt contains it
    key4 = chain.chain_keys(MODEL, DOC, 4)[3].key
    assert _best_for_prefix([_offer(m, everything)], key4, 16, DOC + [9, 9], 1).n_tokens == len(DOC)
    # the tail is not matched when the prompt's tokens there differ
    assert _best_for_prefix([_offer(m, everything)], key4, 16, DOC[:21] + [0, 9], 1).n_tokens == 20


def test_the_extension_is_cut_back_to_what_the_offering_peers_hold():
    m = _doc_manifest(DOC)
    prompt = DOC + [9]
    assert _best_for_prefix([_offer(m, {0, 1})], KEY2, 8, prompt, 1).n_tokens == 8  # holds 2 blocks only
    found = _best_for_prefix([_offer(m, {0, 1, 2}, "A"), _offer(m, {3, 4, 5}, "B")], KEY2, 8, prompt, 1)
    assert found.n_tokens == len(DOC) and sorted(p.peer for p in found.providers) == ["A", "B"]


def test_an_offer_without_the_asked_key_is_ignored():
    m = _doc_manifest(DOC)
    other = chain.chain_keys(MODEL, [1] * 8, 4)[1].key
    assert _best_for_prefix([_offer(m, set(range(6)))], other, 8, DOC, 1) is None
