"""Chain keys: the address of a KV prefix.

KV is valid only as a prefix (positions 0..L-1), so a document is addressed by a hash chain over its
token blocks:

    k0     = BLAKE3("kvnet/chain/v1" || 0x00 || model_id)
    k(i+1) = BLAKE3(k(i) || block i's token ids as u32 little-endian)

with blocks of B tokens (256 by default). A document whose length is not a multiple of B also has a
final key over its partial last block, computed the same way. A prompt that starts with a document
shares every key up to the last block boundary they have in common, which is how "document +
question" prompts and shared system prompts find reusable KV. See docs/artifact.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvnet.errors import KvnetError
from kvnet.hashing import b3

DOMAIN = b"kvnet/chain/v1\x00"
DEFAULT_BLOCK_SIZE = 256
MAX_TOKEN_ID = 2**32 - 1


class ChainError(KvnetError, ValueError):
    """Chain keys were asked for impossible input (a bad model id, token id or block size)."""


def root_key(model_id: bytes) -> bytes:
    """k0: the chain's anchor, specific to one model identity."""
    if len(model_id) != 32:
        raise ChainError(f"model_id must be 32 bytes, got {len(model_id)}")
    return b3(DOMAIN, model_id)


def _pack(tokens: list[int]) -> bytes:
    if any(not 0 <= t <= MAX_TOKEN_ID for t in tokens):
        raise ChainError("token ids must fit in u32")
    return struct.pack(f"<{len(tokens)}I", *tokens)


def next_key(key: bytes, block: list[int]) -> bytes:
    """Extend the chain by one (full or partial) block of tokens."""
    if not block:
        raise ChainError("a chain block must hold at least one token")
    return b3(key, _pack(block))


@dataclass(frozen=True)
class ChainKey:
    """The key of the prefix of `n_tokens` tokens."""

    n_tokens: int
    key: bytes


def chain_keys(model_id: bytes, tokens: list[int], block_size: int = DEFAULT_BLOCK_SIZE) -> list[ChainKey]:
    """Keys at every block boundary, then one for the partial last block if there is one."""
    if block_size < 1:
        raise ChainError("block_size must be positive")
    out: list[ChainKey] = []
    key = root_key(model_id)
    for start in range(0, len(tokens), block_size):
        block = tokens[start : start + block_size]
        key = next_key(key, block)
        out.append(ChainKey(start + len(block), key))
    return out


def key_at(model_id: bytes, tokens: list[int], n_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE) -> bytes:
    """The key of the first `n_tokens` tokens, where n_tokens is a block boundary or a partial tail.

    Used to test a prompt against a document's final partial key: the prompt's own key over the same
    number of tokens must equal it.
    """
    if not 0 < n_tokens <= len(tokens):
        raise ChainError(f"n_tokens {n_tokens} outside 1..{len(tokens)}")
    full = (n_tokens // block_size) * block_size
    keys = chain_keys(model_id, tokens[:full], block_size)
    key = keys[-1].key if keys else root_key(model_id)
    if n_tokens > full:
        key = next_key(key, tokens[full:n_tokens])
    return key
