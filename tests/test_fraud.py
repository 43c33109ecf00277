"""Fraud proofs: a poisoned artifact's proof, made by `kvnet audit`, verifies in a separate process
(`kvnet audit verify`) from a home or a folder of pieces; false proofs are rejected by a named rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import audit, canonical, fraud
from kvnet.engine import Engine, compute_profile
from kvnet.store import Store
from tests.artifacts import ROOT
from tests.poison import honest_artifact, poisoned_artifact, put

B = 64
# ASCII texts, so the byte tokenizer gives one token per character and a prompt file round-trips
DOC_TEXT = "".join(chr(97 + (i * 7 + i // 5) % 26) for i in range(4 * B))
OTHER_TEXT = "".join(chr(65 + (i * 11 + 3) % 26) for i in range(4 * B))


def _kvnet(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kvnet.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def poisoned(tiny_bf16):
    key = Ed25519PrivateKey.generate()
    doc, other = tiny_bf16.tokenizer.encode(DOC_TEXT), tiny_bf16.tokenizer.encode(OTHER_TEXT)
    sm, pieces = poisoned_artifact(tiny_bf16, key, doc, other, forged=2, block_size=B)
    return sm, pieces, doc


@pytest.fixture(scope="module")
def proof(tiny_bf16, poisoned) -> bytes:
    sm, pieces, doc = poisoned
    report = audit.audit(tiny_bf16, sm, doc, lambda i: pieces[i], blocks=[2])
    return fraud.build_proof(sm, report.blocks[0], doc)


def _home(tmp_path: Path, sm, pieces) -> Path:
    home = tmp_path / "home"
    with Store(home / "store") as store:
        put(store, sm, pieces)
    return home


def test_kvnet_audit_catches_block_2_and_its_proof_verifies_in_another_process(tmp_path, poisoned):
    sm, pieces, _ = poisoned
    home = _home(tmp_path, sm, pieces)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(DOC_TEXT + "\nWhat does it say?", encoding="utf-8")
    base = ["--prompt-file", str(prompt), "--model", "tiny", "--home", str(home)]
    r = _kvnet("audit", sm.id.hex()[:12], *base, "--all", "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert [b["block"] for b in report["blocks"]] == [0, 1, 2, 3] and report["covered_blocks"] == 4
    assert [b["block"] for b in report["blocks"] if b["verdict"] == "mismatch"] == [2]
    assert report["same_profile"] and not report["ok"]
    assert "error:" in r.stderr and "blocks 2 (rel" in r.stderr
    (proof_path,) = report["proofs"]
    assert Path(proof_path).parent == home / "proofs"
    r2 = _kvnet("audit", sm.id.hex(), *base, "--block", "2", "--proof-dir", str(tmp_path / "p2"))
    assert r2.returncode == 1 and "mismatch" in r2.stdout, r2.stdout + r2.stderr
    assert (tmp_path / "p2" / f"{sm.id.hex()}.2.kvproof").read_bytes() == Path(proof_path).read_bytes()

    v = _kvnet("audit", "verify", proof_path, "--model", "tiny", "--pieces", str(home), "--json")
    assert v.returncode == 0, v.stderr
    out = json.loads(v.stdout)
    assert (out["ok"], out["block"], out["manifest_id"]) == (True, 2, sm.id.hex())
    assert out["rel"] > out["tolerance"] and out["publisher"] == sm.manifest.publisher.hex()



def test_a_proof_verifies_from_a_folder_of_pieces_or_a_store(tmp_path, tiny_bf16, poisoned, proof):
    """The pieces sources of `kvnet audit verify --pieces`: a plain folder of files named by their
    BLAKE3 (only those blocks 0..j need), a store directory, a home."""
    sm, pieces, _ = poisoned
    folder = tmp_path / "pieces"
    folder.mkdir()
    for i in sm.manifest.pieces_for_tokens(3 * B):
        (folder / sm.manifest.pieces[i].hex()).write_bytes(pieces[i])
    assert len(list(folder.iterdir())) < len(pieces)
    home = _home(tmp_path, sm, pieces)
    for source in (folder, home / "store", home):
        read, close = fraud.pieces_reader(sm, source)
        try:
            assert fraud.verify_proof(proof, tiny_bf16, read).proof.block == 2
        finally:
            close()
    read, close = fraud.pieces_reader(sm, tmp_path / "empty")
    assert _rule(proof, tiny_bf16, None, read) == "pieces"


def test_a_correct_artifact_passes_the_cli_audit(tmp_path, tiny_bf16, key):
    doc = tiny_bf16.tokenizer.encode(DOC_TEXT)
    sm, pieces = honest_artifact(tiny_bf16, key, doc, B)
    home = _home(tmp_path, sm, pieces)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(DOC_TEXT, encoding="utf-8")
    r = _kvnet("audit", sm.id.hex(), "--prompt-file", str(prompt), "--model", "tiny", "--home", str(home), "--all")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("block ") == 4 and "mismatch" not in r.stdout
    assert not (home / "proofs").exists()


def test_a_proof_verifies_in_process(tiny_bf16, poisoned, proof):
    sm, pieces, _ = poisoned
    v = fraud.verify_proof(proof, tiny_bf16, lambda i: pieces[i])
    assert v.proof.block == 2 and v.proof.manifest_id == sm.id and v.rel > v.tolerance
    assert fraud.check_proof(proof).id == v.proof.id


def _forge(proof: bytes, **changes) -> bytes:
    d = canonical.decode(proof, fraud.MAX_PROOF_BYTES)
    d.update(changes)
    return canonical.encode(d)


def _rule(raw: bytes, engine, pieces, read=None) -> str:
    with pytest.raises(fraud.ProofError) as err:
        fraud.verify_proof(raw, engine, read or (lambda i: pieces[i]))
    assert str(err.value).startswith(f"proof rejected ({err.value.rule}): ")
    return err.value.rule


def test_false_proofs_are_rejected_by_a_named_rule(tiny_bf16, poisoned, proof):
    sm, pieces, doc = poisoned
    d = canonical.decode(proof, fraud.MAX_PROOF_BYTES)
    toks = fraud.decode_tokens(d["tokens"])
    tampered = list(toks)
    tampered[5] ^= 1
    assert _rule(_forge(proof, tokens=fraud.encode_tokens(tampered)), tiny_bf16, pieces) == "chain"
    # wrong block: the same accusation moved to block 1 (tokens cut to match, the hashes kept)
    assert _rule(_forge(proof, block=1, tokens=fraud.encode_tokens(toks[: 2 * B])), tiny_bf16, pieces) == "recompute"
    assert _rule(_forge(proof, block=1), tiny_bf16, pieces) == "tokens"
    # honest block: a proof against block 1 (or 3) whose hashes really are its recomputation
    for j in (1, 3):
        honest = audit.audit(tiny_bf16, sm, doc, lambda i: pieces[i], blocks=[j]).blocks[0]
        assert honest.passed
        raw = _forge(proof, block=j, tokens=fraud.encode_tokens(doc[: (j + 1) * B]), recomputed=list(honest.recomputed))
        assert _rule(raw, tiny_bf16, pieces) == "honest"
        with pytest.raises(fraud.ProofError, match=r"\(honest\)"):
            fraud.build_proof(sm, honest, doc)
    bad_hash = list(d["recomputed"])
    bad_hash[1] = bytes(32)
    assert _rule(_forge(proof, recomputed=bad_hash), tiny_bf16, pieces) == "recompute"
    assert _rule(_forge(proof, recomputed=bad_hash[:1]), tiny_bf16, pieces) == "hashes"
    assert _rule(_forge(proof, block=4), tiny_bf16, pieces) == "block"
    man = bytearray(d["manifest"])
    man[-5] ^= 1  # inside the signature
    assert _rule(_forge(proof, manifest=bytes(man)), tiny_bf16, pieces) == "manifest"
    assert _rule(_forge(proof, v=2), tiny_bf16, pieces) == "version"
    assert _rule(_forge(proof, extra=1), tiny_bf16, pieces) == "fields"
    assert _rule(proof[:-1], tiny_bf16, pieces) == "encoding"
    assert _rule(b"\x00" * (fraud.MAX_PROOF_BYTES + 1), tiny_bf16, pieces) == "size"
    assert _rule(proof, tiny_bf16, [p[:-1] for p in pieces]) == "pieces"


def test_a_proof_needs_the_producers_model_and_profile(tiny_fp32, poisoned, proof):
    _, pieces, _ = poisoned
    assert _rule(proof, tiny_fp32, pieces) == "model"
    eager = Engine("tiny", "bf16")
    eager.model.set_attn_implementation("eager")
    eager.profile = compute_profile("eager")
    assert _rule(proof, eager, pieces) == "profile"


def test_the_proof_rules_need_no_torch(proof, tmp_path):
    path = tmp_path / "p.kvproof"
    path.write_bytes(proof)
    code = ("import sys; from pathlib import Path; from kvnet import fraud; "
            f"p = fraud.check_proof(Path({str(path)!r}).read_bytes()); "
            "print(p.block, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "False"]


def test_a_proof_record_names_its_author_and_refuses_forgeries(proof):
    """The DHT record around a proof (docs/audits.md, "The proof record"): signed by its author, and
    every envelope rule refuses by name before the proof's own rules run."""
    author = Ed25519PrivateKey.generate()
    raw = fraud.sign_record(author, proof)
    rec = fraud.open_record(raw)
    assert rec.author == fraud.identity.public_bytes(author) and rec.proof.raw == proof
    assert rec.manifest_id == fraud.check_proof(proof).manifest_id
    d = canonical.decode(raw, fraud.MAX_RECORD_BYTES)
    other = fraud.identity.public_bytes(Ed25519PrivateKey.generate())
    tampered = canonical.decode(proof, fraud.MAX_PROOF_BYTES)
    tampered["block"] = 1
    cases = [
        ("record_size", b"\x00" * (fraud.MAX_RECORD_BYTES + 1)),
        ("record_encoding", b"\xc1"),
        ("record_fields", proof),  # an unsigned proof is not a record
        ("record_fields", canonical.encode({**d, "author": other[:31]})),
        ("record_version", canonical.encode({**d, "v": 2})),
        ("record_sig", canonical.encode({**d, "author": other})),  # another author claims the signature
        ("record_sig", canonical.encode({**d, "proof": canonical.encode(tampered)})),  # another proof inside
    ]
    for rule, bad in cases:
        with pytest.raises(fraud.ProofError) as err:
            fraud.open_record(bad)
        assert err.value.rule == rule
    with pytest.raises(fraud.ProofError, match=r"\(tokens\)"):
        fraud.sign_record(author, canonical.encode(tampered))  # a node never signs a malformed proof


def test_only_a_judged_rule_proves_a_proof_false(tiny_bf16, tiny_fp32, poisoned, proof):
    """`recompute` and `honest` prove the author wrong (kvnet.p2p.proofs scores it down); another
    profile or missing pieces only mean "cannot judge here" (nobody is blamed)."""
    sm, pieces, doc = poisoned
    d = canonical.decode(proof, fraud.MAX_PROOF_BYTES)
    wrong_hashes = canonical.encode({**d, "recomputed": [bytes(32)] * len(d["recomputed"])})
    with pytest.raises(fraud.ProofError) as err:
        fraud.verify_proof(wrong_hashes, tiny_bf16, lambda i: pieces[i])
    assert err.value.rule == "recompute" and err.value.rule in fraud.JUDGED_RULES
    for engine, read, rule in [(tiny_fp32, lambda i: pieces[i], "model"),
                               (tiny_bf16, lambda i: (_ for _ in ()).throw(fraud.ProofError("pieces", "gone")),
                                "pieces")]:
        with pytest.raises(fraud.ProofError) as err:
            fraud.verify_proof(proof, engine, read)
        assert err.value.rule == rule and rule not in fraud.JUDGED_RULES
