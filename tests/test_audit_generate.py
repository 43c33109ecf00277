"""`kvnet generate` audits the artifact it reused after printing the answer (a real CLI process, real
tiny-model passes): a poisoned artifact is answered from, then found out, its proof written to
<home>/proofs/ (for a node on that home to sign and put in the DHT), and refused: removed from the
store and remembered in <home>/refusals.sqlite, so the next run does not reuse it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import fraud
from kvnet.refusals import FILENAME, Refusals
from kvnet.store import Store
from tests.artifacts import ROOT
from tests.poison import poisoned_artifact, put

B = 64
DOC_TEXT = "".join(chr(97 + (i * 5 + i // 3) % 26) for i in range(4 * B))
OTHER_TEXT = "".join(chr(65 + (i * 13 + 1) % 26) for i in range(4 * B))


def _generate(home, prompt, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kvnet.cli", "generate", "--model", "tiny", "--prompt-file",
                           str(prompt), "--home", str(home), "--max-new-tokens", "2", "--no-baseline", "--json",
                           *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)


def test_generate_audits_after_answering_and_refuses_a_poisoned_artifact(tmp_path, tiny_bf16):
    tok = tiny_bf16.tokenizer
    doc = tok.encode(DOC_TEXT)
    sm, pieces = poisoned_artifact(tiny_bf16, Ed25519PrivateKey.generate(), doc, tok.encode(OTHER_TEXT),
                                   forged=2, block_size=B)
    home = tmp_path / "home"
    with Store(home / "store") as store:
        put(store, sm, pieces)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(DOC_TEXT + " and then?", encoding="utf-8")

    off = _generate(home, prompt, "--no-audit")
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout)["audit"] == "off"

    r = _generate(home, prompt, "--audit-blocks", "8")
    assert r.returncode == 0, r.stderr  # the answer is given: the audit judges the artifact afterwards
    out = json.loads(r.stdout)
    assert out["cached_tokens"] == len(doc) and out["manifest_id"] == sm.id.hex() and out["audit"] == "queued"
    assert f"audit of {sm.id.hex()[:16]}: blocks [0, 1, 2, 3] FAILED blocks [2]" in r.stderr
    path = home / "proofs" / f"{sm.id.hex()}.2.kvproof"
    assert f"artifact refused; fraud proof written to {path}" in r.stderr
    assert fraud.check_proof(path.read_bytes()).block == 2
    assert Refusals(home / FILENAME).is_refused(sm.id)
    with Store(home / "store", read_only=True) as store:
        assert store.entries() == []

    again = _generate(home, prompt)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cached_tokens"] == 0 and json.loads(again.stdout)["audit"] == "off"
