"""Canonical msgpack: one byte string per value, so hashes and signatures are reproducible.

Rules (docs/artifact.md, "Canonical msgpack"): maps have str keys sorted by their UTF-8 bytes and no
duplicates; every header takes msgpack's shortest form (ints, str, bin, array, map); bytes are bin,
text is str; bool and nil are allowed; no floats, because times and prices are integers and a float
has several plausible encodings. The one exception is the model identity, which must carry config.json
floats: `encode(..., allow_float=True)` writes them as float 64 (0xcb), and only `kvnet.models` uses it.
`decode` never accepts floats and rejects any input whose re-encoding differs, so two different byte
strings never decode to the same value (ids stay unique).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from kvnet.errors import KvnetError

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
# Arrays and maps nested deeper than this are refused by `decode` (the top-level value is depth 1).
# kvnet's deepest structure, a manifest, is 2 deep; without a limit a 500-deep frame from a peer made
# the re-encoding check recurse until RecursionError (answered `internal` instead of `malformed`).
MAX_DEPTH = 32


class CanonicalError(KvnetError, ValueError):
    """Input is not valid canonical msgpack."""


def _check(value: Any, allow_float: bool, path: str = "$") -> None:
    """Refuse types that have no single canonical encoding."""
    if value is None or isinstance(value, bool | bytes):
        return
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise CanonicalError(f"{path}: integer {value} is outside msgpack's range")
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CanonicalError(f"{path}: text is not valid Unicode (lone surrogate)") from exc
        return
    if isinstance(value, float):
        if not allow_float:
            raise CanonicalError(f"{path}: floats are not allowed in canonical encodings")
        if not math.isfinite(value):
            raise CanonicalError(f"{path}: only finite floats can be encoded")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, allow_float, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalError(f"{path}: map keys must be str, got {type(key).__name__}")
            _check(key, allow_float, f"{path} key")
            _check(item, allow_float, f"{path}.{key}")
        return
    raise CanonicalError(f"{path}: type {type(value).__name__} cannot be encoded")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda s: s.encode())}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def encode(value: Any, *, allow_float: bool = False) -> bytes:
    """Encode `value` canonically. `allow_float` is for the model identity only (see module doc)."""
    _check(value, allow_float)
    # msgpack-python already picks the shortest header for every type, uses str8 for short text
    # (use_bin_type) and writes Python floats as float 64: exactly the canonical choices.
    return msgpack.packb(_sorted(value), use_bin_type=True)


def _depth_ok(value: Any, limit: int) -> bool:
    """Is every array or map in `value` nested at most `limit` deep? Iterative, so it cannot itself
    hit Python's recursion limit (msgpack's C unpacker decodes up to 1024 levels without recursing)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def decode(data: bytes, max_size: int = 16 * 1024 * 1024) -> Any:
    """Decode canonical msgpack, refusing oversized, malformed, too deeply nested (MAX_DEPTH) or
    non-canonical input."""
    if len(data) > max_size:
        raise CanonicalError(f"encoded value is {len(data)} bytes, limit is {max_size}")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise CanonicalError(f"malformed msgpack: {exc}") from exc
    if not _depth_ok(value, MAX_DEPTH):
        raise CanonicalError(f"nested deeper than {MAX_DEPTH} arrays or maps")
    try:
        again = encode(value)
    except CanonicalError as exc:
        raise CanonicalError(f"not canonical: {exc}") from exc
    if again != data:
        raise CanonicalError("not canonical: re-encoding differs from the input")
    return value
