"""P publishes; C knows only the bootstrap node B; C finds P by a prompt's chain keys, fetches,
verifies, loads and generates with cached_tokens = the shared prefix, token-exact."""

import pytest
import trio

from kvnet.publish import publish_tokens
from kvnet.reuse import answer
from tests.conftest import random_tokens
from tests.p2p.conftest import make_node as _node

B = 256


@pytest.mark.trio
async def test_find_by_prefix_fetch_and_generate(tmp_path, tiny_fp32):
    doc = random_tokens(4 * B + 40, seed=31)
    p_node = _node(tmp_path, "P")
    publish_tokens(tiny_fp32, p_node.store, p_node.key, doc, piece_size=16384)
    async with trio.open_nursery() as n:
        b_node = await n.start(_node(tmp_path, "B").run)
        await n.start(_node(tmp_path, "X", [b_node.addrs[0]]).run)  # an unrelated peer
        p_node.bootstrap = [b_node.addrs[0]]
        p = await n.start(p_node.run)
        c = await n.start(_node(tmp_path, "C", [b_node.addrs[0]]).run)
        assert c.bootstrap == [b_node.addrs[0]]  # C was told only about B; it learns P via the DHT

        prompt = doc[: 3 * B] + random_tokens(30, seed=32)  # shares 3 of the document's 5 blocks
        found = await c.find(tiny_fp32.model_id, prompt)
        assert found is not None and found.n_tokens == 3 * B
        assert [pr.peer for pr in found.providers] == [p.peer_id.to_base58()]
        assert found.dht_queries <= 3
        result = await c.fetch(found)
        m = found.signed.manifest
        assert result.fetched == len(m.pieces_for_tokens(3 * B)) < len(m.pieces)  # only the prefix
        n.cancel_scope.cancel()

    ans = answer(tiny_fp32, c.store, prompt, 12, stop_at_eos=False)
    assert ans.cached_tokens == 3 * B
    assert ans.tokens == tiny_fp32.generate_from(None, prompt, 12).tokens
