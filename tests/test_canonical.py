import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvnet import canonical

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_roundtrip_is_identity(value):
    assert canonical.encode(canonical.decode(canonical.encode(value))) == canonical.encode(value)


def test_key_order_does_not_matter():
    assert canonical.encode({"b": 1, "a": 2}) == canonical.encode({"a": 2, "b": 1})


def test_non_canonical_input_is_rejected():
    unsorted = msgpack.packb({"b": 1, "a": 2})
    with pytest.raises(canonical.CanonicalError, match="not canonical"):
        canonical.decode(unsorted)


def test_floats_and_garbage_are_rejected():
    with pytest.raises(canonical.CanonicalError, match="floats"):
        canonical.encode({"x": 1.5})
    with pytest.raises(canonical.CanonicalError, match="malformed"):
        canonical.decode(b"\xc1\x00")
    with pytest.raises(canonical.CanonicalError, match="limit"):
        canonical.decode(b"\x00" * 100, max_size=10)
