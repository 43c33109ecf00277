import math

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvnet import canonical

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=40) | st.binary(max_size=300),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=8), inner, max_size=20),
    max_leaves=40,
)


def same(a, b) -> bool:
    """Equal values of equal types, recursively (plain == would let True pass for 1, 1.0 for 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    return a == b


@given(values)
def test_decode_inverts_encode(value):
    decoded = canonical.decode(canonical.encode(value))
    assert decoded == value
    assert same(decoded, value)


def test_key_order_does_not_matter():
    assert canonical.encode({"b": 1, "a": 2}) == canonical.encode({"a": 2, "b": 1})


def test_keys_sort_by_utf8_bytes():
    # "z" (0x7a) sorts before "é" (0xc3 0xa9); "B" (0x42) before "a"; a prefix before its extensions.
    assert list(canonical.decode(canonical.encode({"é": 0, "z": 0, "a": 0, "B": 0, "aa": 0}))) == \
        ["B", "a", "aa", "z", "é"]


def test_non_canonical_input_is_rejected():
    unsorted = msgpack.packb({"b": 1, "a": 2})
    with pytest.raises(canonical.CanonicalError, match="not canonical"):
        canonical.decode(unsorted)
    for long_form in (b"\xcc\x05", b"\xd9\x01a", b"\xc5\x00\x01a", b"\xdc\x00\x00", b"\x82\xa1a\x01\xa1a\x02"):
        with pytest.raises(canonical.CanonicalError):
            canonical.decode(long_form)


def test_floats_and_garbage_are_rejected():
    with pytest.raises(canonical.CanonicalError, match="floats"):
        canonical.encode({"x": 1.5})
    with pytest.raises(canonical.CanonicalError, match="malformed"):
        canonical.decode(b"\xc1\x00")
    with pytest.raises(canonical.CanonicalError, match="limit"):
        canonical.decode(b"\x00" * 100, max_size=10)
    with pytest.raises(canonical.CanonicalError, match="range"):
        canonical.encode(2**64)
    with pytest.raises(canonical.CanonicalError, match="Unicode"):
        canonical.encode("\ud800")


def test_float_opt_in_is_float64_and_never_decodes():
    """Only the model identity carries floats; manifests and frames must still refuse them."""
    data = canonical.encode({"eps": 1e-06}, allow_float=True)
    assert data == b"\x81\xa3eps\xcb" + bytes.fromhex("3eb0c6f7a0b5ed8d")
    with pytest.raises(canonical.CanonicalError, match="not canonical"):
        canonical.decode(data)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(canonical.CanonicalError, match="finite"):
            canonical.encode([bad], allow_float=True)
