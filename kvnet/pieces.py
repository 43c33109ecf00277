"""Torch-free artifact pieces: splitting artifact bytes into pieces and verifying a piece.

Split out of `kvnet.artifact` so that storage and network code (`kvnet.store`, `kvnet.p2p`) never
import torch: a serving node only moves and verifies bytes, and importing torch costs seconds of
start-up and hundreds of MB per process. `kvnet.artifact` re-exports everything here.
"""

from __future__ import annotations

from kvnet.errors import KvnetError
from kvnet.hashing import b3
from kvnet.manifest import MAX_PIECE_SIZE, Manifest


class ArtifactError(KvnetError, ValueError):
    """A piece failed verification or the KV does not fit the engine; nothing was loaded."""


class WrongModelError(ArtifactError):
    """The artifact was computed by a different model than the engine that wants to load it."""


def split_pieces(data: memoryview, piece_size: int = MAX_PIECE_SIZE) -> list[memoryview]:
    """Cut artifact bytes into pieces of `piece_size` bytes (the last one may be shorter)."""
    return [data[i : i + piece_size] for i in range(0, len(data), piece_size)]


def verify_piece(m: Manifest, index: int, data: bytes | bytearray | memoryview) -> None:
    """Length and BLAKE3 of piece `index` against the signed manifest."""
    if not 0 <= index < len(m.pieces):
        raise ArtifactError(f"piece {index} out of range (artifact has {len(m.pieces)})")
    want = m.piece_len(index)
    if len(data) != want:
        raise ArtifactError(f"piece {index}: {len(data)} bytes, manifest says {want} (truncated or padded)")
    if b3(data) != m.pieces[index]:
        raise ArtifactError(f"piece {index}: BLAKE3 mismatch (corrupt or forged)")
