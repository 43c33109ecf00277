"""KVBuilder places verified pieces into KV tensors in any order, from several threads, for any piece
size (pieces that cut a head's row, even an element, in two) and any prefix length: the result is
exactly the published KV, and it refuses to hand out a KV with a piece missing."""

import random
import threading

import pytest
import torch

from kvnet import artifact
from tests.conftest import random_tokens

DOC = random_tokens(300, seed=31)


@pytest.fixture(scope="module")
def reference(tiny_bf16):
    kv = tiny_bf16.prefill(DOC)
    return kv, artifact.kv_to_bytes(kv, tiny_bf16.layout, 256)


def _published(engine, data, key, piece_size):
    sm = artifact.build_manifest(engine, DOC, data, key, piece_size=piece_size)
    return sm.manifest, [bytes(p) for p in artifact.split_pieces(data, piece_size)]


def _equal_prefix(kv, want, n):
    assert kv.n_tokens == n
    for got, ref in zip(kv.keys + kv.values, want.keys + want.values, strict=True):
        assert torch.equal(got, ref[:, :, :n])


@pytest.mark.parametrize("piece_size", [8192, 4097, 1001, 1 << 20])
@pytest.mark.parametrize("n_tokens", [300, 257, 256, 45, 1])
def test_pieces_in_any_order_build_exactly_the_published_prefix(tiny_bf16, reference, key, piece_size, n_tokens):
    want, data = reference
    m, pieces = _published(tiny_bf16, data, key, piece_size)
    b = artifact.KVBuilder(m, tiny_bf16, n_tokens)
    needed = b.missing()
    assert needed == list(m.pieces_for_tokens(n_tokens))  # exactly the pieces a fetch of n tokens asks for
    order = list(range(len(pieces)))  # pieces beyond the prefix are ignored, not an error
    random.Random(piece_size + n_tokens).shuffle(order)
    for i in order:
        b.add(i, memoryview(bytearray(pieces[i])))
    _equal_prefix(b.kv(), want, n_tokens)


def test_threads_adding_distinct_pieces_and_duplicates_build_the_same_kv(tiny_bf16, reference, key):
    want, data = reference
    m, pieces = _published(tiny_bf16, data, key, 1001)
    b = artifact.KVBuilder(m, tiny_bf16)
    order = [i for i in range(len(pieces)) for _ in range(2)]  # every piece twice: the second is ignored
    random.Random(5).shuffle(order)
    threads = [threading.Thread(target=lambda part: [b.add(i, pieces[i]) for i in part], args=(order[k::4],))
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _equal_prefix(b.kv(), want, 300)


def test_a_missing_piece_or_a_wrong_length_is_refused(tiny_bf16, reference, key):
    _, data = reference
    m, pieces = _published(tiny_bf16, data, key, 8192)
    b = artifact.KVBuilder(m, tiny_bf16)
    for i, p in enumerate(pieces):
        if i != 2:
            b.add(i, p)
    assert b.missing() == [2]
    with pytest.raises(artifact.ArtifactError, match="1 of .* pieces were never added"):
        b.kv()
    with pytest.raises(artifact.ArtifactError, match="piece 2: 8191 bytes"):
        b.add(2, pieces[2][:-1])
    b.add(2, pieces[2])  # a refused add claims nothing: the right bytes still go in
    assert b.missing() == []
    with pytest.raises(artifact.ArtifactError, match="cannot load 301 tokens"):
        artifact.KVBuilder(m, tiny_bf16, 301)
