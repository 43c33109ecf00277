"""BLAKE3 helpers. Every content address in kvnet is a 32-byte BLAKE3 digest."""

from __future__ import annotations

import blake3


def b3(*parts: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 of the concatenation of `parts`."""
    h = blake3.blake3()
    for part in parts:
        h.update(part)
    return h.digest()
