"""BLAKE3 helpers. Every content address in kvnet is a 32-byte BLAKE3 digest."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import blake3

DIGEST_SIZE = 32


def b3(*parts: bytes | memoryview) -> bytes:
    """BLAKE3 of the concatenation of `parts`."""
    h = blake3.blake3()
    for part in parts:
        h.update(part)
    return h.digest()


def b3_file(path: Path, chunk: int = 8 * 1024 * 1024) -> bytes:
    """Stream a file through BLAKE3 without reading it whole."""
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


def b3_stream(chunks: Iterable[bytes | memoryview]) -> bytes:
    h = blake3.blake3()
    for c in chunks:
        h.update(c)
    return h.digest()


def hexid(digest: bytes) -> str:
    return digest.hex()


def parse_hexid(text: str) -> bytes:
    """Parse a 64-char hex id, with a clear error."""
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"not a hex id: {text!r}") from exc
    if len(raw) != DIGEST_SIZE:
        raise ValueError(f"id must be {DIGEST_SIZE} bytes ({2 * DIGEST_SIZE} hex chars), got {len(raw)}")
    return raw
