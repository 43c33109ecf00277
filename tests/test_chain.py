import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvnet import chain
from kvnet.errors import KvnetError

VECTORS = json.loads((Path(__file__).parents[1] / "docs" / "chain-vectors.json").read_text())
MODEL = bytes.fromhex(VECTORS["model_id"])


def test_committed_vectors():
    assert chain.root_key(MODEL).hex() == VECTORS["root_key"]
    for case in VECTORS["cases"]:
        got = chain.chain_keys(MODEL, case["tokens"], case["block_size"])
        assert [{"n_tokens": k.n_tokens, "key": k.key.hex()} for k in got] == case["keys"], case["name"]


@given(st.lists(st.integers(0, 2**32 - 1), max_size=40), st.lists(st.integers(0, 2**32 - 1), max_size=40),
       st.integers(1, 8))
def test_shared_prefix_shares_boundary_keys(a, b, bs):
    """A prompt that extends a document shares every key at the document's full block boundaries."""
    doc_keys = chain.chain_keys(MODEL, a, bs)
    prompt_keys = {k.key: k.n_tokens for k in chain.chain_keys(MODEL, a + b, bs)}
    for k in doc_keys:
        if k.n_tokens % bs == 0:
            assert prompt_keys.get(k.key) == k.n_tokens
        # the partial tail's key is reproducible from the prompt itself
        assert chain.key_at(MODEL, a + b, k.n_tokens, bs) == k.key


def test_keys_depend_on_model_and_tokens():
    t = list(range(10))
    assert chain.chain_keys(MODEL, t, 4) != chain.chain_keys(bytes(32), t, 4)
    assert chain.chain_keys(MODEL, t, 4)[0] != chain.chain_keys(MODEL, [1] + t[1:], 4)[0]


def test_impossible_input_is_a_chain_error():
    for call in (lambda: chain.root_key(b"short"), lambda: chain.chain_keys(MODEL, [2**32], 4),
                 lambda: chain.chain_keys(MODEL, [1], 0), lambda: chain.key_at(MODEL, [1, 2], 3, 4),
                 lambda: chain.next_key(MODEL, [])):
        with pytest.raises(chain.ChainError) as info:
            call()
        assert isinstance(info.value, KvnetError)
