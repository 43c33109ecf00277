"""Canonical msgpack: one byte string per value, so hashes and signatures are reproducible.

Rules: maps have str keys sorted by their UTF-8 bytes, ints use msgpack's smallest encoding, bytes are
bin, text is str, no floats (times and prices are integers). `decode` rejects any input whose re-encoding
differs, so two different byte strings never decode to the same value (ids stay unique).
"""

from __future__ import annotations

from typing import Any

import msgpack

from kvnet.errors import KvnetError


class CanonicalError(KvnetError, ValueError):
    """Input is not valid canonical msgpack."""


def _check(value: Any, path: str = "$") -> None:
    """Refuse types that have no single canonical encoding."""
    if value is None or isinstance(value, bool | int | str | bytes):
        return
    if isinstance(value, float):
        raise CanonicalError(f"{path}: floats are not allowed in canonical encodings")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalError(f"{path}: map keys must be str, got {type(key).__name__}")
            _check(item, f"{path}.{key}")
        return
    raise CanonicalError(f"{path}: type {type(value).__name__} cannot be encoded")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=lambda s: s.encode())}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    """Encode `value` canonically."""
    _check(value)
    return msgpack.packb(_sorted(value), use_bin_type=True)


def decode(data: bytes, max_size: int = 16 * 1024 * 1024) -> Any:
    """Decode canonical msgpack, refusing oversized, malformed or non-canonical input."""
    if len(data) > max_size:
        raise CanonicalError(f"encoded value is {len(data)} bytes, limit is {max_size}")
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise CanonicalError(f"malformed msgpack: {exc}") from exc
    try:
        again = encode(value)
    except CanonicalError as exc:
        raise CanonicalError(f"not canonical: {exc}") from exc
    if again != data:
        raise CanonicalError("not canonical: re-encoding differs from the input")
    return value
