"""Regenerate docs/chain-vectors.json from the spec in docs/artifact.md, using blake3 directly
(independently of kvnet.chain, which the tests then check against this file)."""

import json
import struct
from pathlib import Path

import blake3

MODEL_ID = blake3.blake3(b"kvnet chain test vector model").digest()
CASES = [
    {"name": "empty", "block_size": 256, "tokens": []},
    {"name": "one token", "block_size": 256, "tokens": [0]},
    {"name": "partial tail", "block_size": 2, "tokens": [1, 2, 3]},
    {"name": "u32 extremes", "block_size": 1, "tokens": [4294967295, 151935, 0]},
    {"name": "600 tokens", "block_size": 256, "tokens": list(range(600))},
    {"name": "exact blocks", "block_size": 4, "tokens": [7] * 8},
]


def keys(tokens, bs):
    key = blake3.blake3(b"kvnet/chain/v1\x00" + MODEL_ID).digest()
    out = []
    for s in range(0, len(tokens), bs):
        block = tokens[s : s + bs]
        key = blake3.blake3(key + struct.pack(f"<{len(block)}I", *block)).digest()
        out.append({"n_tokens": s + len(block), "key": key.hex()})
    return out


doc = {
    "model_id": MODEL_ID.hex(),
    "root_key": blake3.blake3(b"kvnet/chain/v1\x00" + MODEL_ID).digest().hex(),
    "cases": [{**c, "keys": keys(c["tokens"], c["block_size"])} for c in CASES],
}
Path(__file__).with_name("chain-vectors.json").write_text(json.dumps(doc, indent=1) + "\n")
