"""Two separate processes publishing the same document produce the same chain keys and piece hashes."""

import json
import subprocess
import sys

PUBLISH = r"""
import json, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
import torch
torch.set_num_threads(int(sys.argv[2]))
from kvnet.engine import Engine
from kvnet.exactness import seeded_document
from kvnet.publish import publish_tokens
from kvnet.store import Store
engine = Engine("tiny", "bf16")
doc = seeded_document(engine.tokenizer, 700, seed=9)
with Store(Path(sys.argv[1])) as store:
    pub = publish_tokens(engine, store, Ed25519PrivateKey.generate(), doc, piece_size=16384)
m = pub.signed.manifest
print(json.dumps({"model_id": m.model_id.hex(), "chain": [k.hex() for k in m.chain],
                  "pieces": [p.hex() for p in m.pieces], "id": pub.manifest_id.hex()}))
"""


def _publish(tmp_path, name, threads):
    out = subprocess.run([sys.executable, "-c", PUBLISH, str(tmp_path / name), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_processes_two_publishers_same_hashes(tmp_path):
    a = _publish(tmp_path, "a", 1)
    b = _publish(tmp_path, "b", 2)
    assert a["model_id"] == b["model_id"]
    assert a["chain"] == b["chain"] and len(a["chain"]) == 3
    assert a["pieces"] == b["pieces"] and len(a["pieces"]) > 1
    assert a["id"] != b["id"]  # different publishers sign different manifests over the same bytes
