"""The prefix search over chain-key boundaries: correct for every answer, with O(log) queries.

The DHT is replaced here by an oracle (which boundaries have providers) because this tests the search
algorithm alone; the real DHT path is covered by test_four_nodes and bench/dht_latency.py.
"""

import math

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from kvnet import chain
from kvnet.p2p import dht as kdht

MODEL = bytes(32)


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
@given(blocks=st.integers(1, 40), data=st.data())
def test_finds_the_longest_provided_boundary(blocks, data):
    answer = data.draw(st.integers(-1, blocks - 1))  # index of the last provided boundary, -1: none
    tokens = list(range(blocks * 4 + 3))
    keys = [k.key for k in chain.chain_keys(MODEL, tokens, 4)][:blocks]
    provided = set(keys[: answer + 1])
    hit, calls = _search(tokens, provided)
    if answer < 0:
        assert hit is None
    else:
        assert hit.n_tokens == (answer + 1) * 4 and hit.key == keys[answer]
    assert len(calls) <= 4 * (math.ceil(math.log(blocks + 1, 5)) + 1)


@pytest.mark.parametrize("blocks", [1, 15, 40])
def test_whole_document_hit_takes_one_round(blocks):
    tokens = list(range(blocks * 4))
    hit, calls = _search(tokens, {k.key for k in chain.chain_keys(MODEL, tokens, 4)})
    assert hit.n_tokens == blocks * 4 and len(calls) <= 4
