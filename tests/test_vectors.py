"""docs/vectors.json: kvnet reproduces every vector, and the independent checker recomputes them.

The checker (docs/check_vectors.py) is run as a subprocess with `kvnet` made unimportable, so it
really works from docs/ alone; a corrupted copy of the vectors (or of the weights) must make it fail.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import canonical, manifest, models, receipts
from kvnet.p2p import wire
from kvnet.tokenizer import ByteTokenizer, encode_chat

DOCS = Path(__file__).parents[1] / "docs"
VECTORS_PATH = DOCS / "vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
CHECKER = DOCS / "check_vectors.py"


def from_typed(t: dict[str, Any]) -> Any:
    """The vectors' typed JSON form -> a value (see docs/artifact.md, "Test vectors")."""
    ((tag, x),) = t.items()
    if tag == "bin":
        return bytes.fromhex(x)
    if tag == "array":
        return [from_typed(i) for i in x]
    if tag == "map":
        return {k: from_typed(i) for k, i in x.items()}
    return x


def _load_make_vectors() -> Any:
    spec = importlib.util.spec_from_file_location("make_vectors", DOCS / "make_vectors.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- (a) kvnet reproduces the vectors --------------------------------------------------------------

def test_committed_vectors_are_what_kvnet_computes_now(tiny_bf16):
    """Any change to a format shows up here until docs/make_vectors.py is rerun and the diff reviewed."""
    mv = _load_make_vectors()
    assert mv.render(mv.build()) == VECTORS_PATH.read_text(encoding="utf-8")


def test_engine_model_ids_match_the_vectors(tiny_bf16, tiny_fp32):
    ids = VECTORS["model_id"]["model_id"]
    assert tiny_bf16.model_id.hex() == ids["bf16"]
    assert tiny_fp32.model_id.hex() == ids["fp32"]
    assert tiny_bf16.tokenizer.identity().hex() == VECTORS["model_id"]["tokenizer_identity"]
    assert models.weights_digest(tiny_bf16.resolved.folder).hex() == VECTORS["model_id"]["weights_digest"]


def test_model_id_preimage_is_the_documented_map():
    v = VECTORS["model_id"]
    config = models.parse_config_json(v["config_json"].encode())
    pre = models.model_id_preimage(config, bytes.fromhex(v["weights_digest"]), "bf16",
                                   bytes.fromhex(v["tokenizer_identity"]))
    assert pre.hex() == v["preimage_bf16_hex"]
    assert canonical.encode(config, allow_float=True).hex() == v["config_hex"]


def test_canonical_cases_and_refusals():
    for case in VECTORS["canonical"]["cases"]:
        value = from_typed(case["value"])
        assert canonical.encode(value).hex() == case["hex"], case["name"]
        assert canonical.decode(bytes.fromhex(case["hex"])) == value, case["name"]
    for name, hx in VECTORS["canonical"]["non_canonical_hex"].items():
        with pytest.raises(canonical.CanonicalError):
            canonical.decode(bytes.fromhex(hx))
            pytest.fail(f"accepted non-canonical input: {name}")


def test_config_cases_and_refusals():
    v = VECTORS["config"]
    assert sorted(models.CONFIG_IGNORED) == v["ignored_keys"]
    for case in v["cases"]:
        got = canonical.encode(models.parse_config_json(case["json"].encode()), allow_float=True)
        assert got.hex() == case["hex"], case["json"]
    for name, text in v["refused"].items():
        with pytest.raises(models.ModelRefError):
            models.parse_config_json(text.encode())
            pytest.fail(f"accepted config: {name}")


def test_byte_tokenizer_matches_vectors():
    v = VECTORS["tokenizer"]["byte"]
    tok = ByteTokenizer()
    assert tok.identity().hex() == v["identity"]
    assert canonical.encode(tok.identity_map()).hex() == v["identity_map_hex"]
    for t in v["texts"]:
        text = bytes.fromhex(t["utf8_hex"]).decode("utf-8")
        assert tok.encode(text) == t["ids"], t["name"]
        assert tok.decode(t["ids"]) == text
    chat = v["chat"]
    assert encode_chat(tok, [tuple(m) for m in chat["messages"]], chat["add_generation_prompt"]) == chat["ids"]


def test_special_strings_in_text_never_become_special_ids():
    tok = ByteTokenizer()
    ids = tok.encode("x<|im_end|>y<|im_start|>system\n<|endoftext|></think>")
    assert max(ids) < 256
    assert tok.special_id("<|im_end|>") == tok.eos_token_id == 258


def test_manifest_vector_signs_and_parses():
    v = VECTORS["manifest"]
    body = from_typed(v["body"])
    assert canonical.encode(body).hex() == v["body_hex"]
    sm = manifest.parse(bytes.fromhex(v["signed_hex"]), now=body["created"])
    assert sm.id.hex() == v["manifest_id"]
    assert sm.manifest.body() == body
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["private_key"]))
    again = sm.manifest.sign(key)  # Ed25519 is deterministic: the same bytes, the same id
    assert again.raw.hex() == v["signed_hex"]
    assert manifest.SIG_DOMAIN.hex() == v["signing_domain_hex"]


def test_payment_vectors_parse_chain_and_settle():
    v = VECTORS["payments"]
    signed = [receipts.parse_receipt(bytes.fromhex(r["signed_hex"])) for r in v["receipts"]]
    assert [sr.id.hex() for sr in signed] == [r["receipt_id"] for r in v["receipts"]]
    assert all(sr.channel_id.hex() == v["channel_id"] for sr in signed)
    for prev, nxt in zip(signed, signed[1:], strict=False):
        receipts.check_next(prev.receipt.seq, prev.receipt.cumulative, prev.id, nxt)
    for rule, hx in v["refused_after_receipt_2"].items():
        with pytest.raises(receipts.ReceiptError) as exc:
            second = signed[1].receipt
            receipts.check_next(second.seq, second.cumulative, signed[1].id, receipts.parse_receipt(bytes.fromhex(hx)))
        assert exc.value.rule == rule
    owed = receipts.verify_batch(bytes.fromhex(v["batch_hex"])).owed()
    assert [{"payer": p.hex(), "currency": c, "amount": a} for (p, c), a in owed.items()] == v["batch_owed"]
    assert all(receipts.hosting_cost(c["bytes"], c["fee_per_mib"]) == c["cost"] for c in v["hosting_cost"])


class _BytesStream:
    """A stream that yields fixed bytes in small reads (a real libp2p stream may split them anyhow)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int | None = None) -> bytes:
        chunk, self.data = self.data[: min(n or 7, 7)], self.data[min(n or 7, 7) :]
        return chunk

    async def write(self, data: bytes) -> None:
        raise AssertionError("read-only")


def test_wire_frames_match_vectors():
    for f in VECTORS["wire"]:
        msg = from_typed(f["message"])
        assert wire.frame(msg).hex() == f["frame_hex"], f["name"]
        got = trio.run(wire.read_frame, _BytesStream(bytes.fromhex(f["frame_hex"])), wire.MAX_RESPONSE)
        assert got == msg, f["name"]


# -- (b) and (c): the independent checker ---------------------------------------------------------

def _run_checker(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the checker with `import kvnet` made impossible, so passing proves it never needs kvnet."""
    code = ("import runpy, sys; sys.modules['kvnet'] = None; "
            f"sys.argv = [{str(CHECKER)!r}] + sys.argv[1:]; runpy.run_path({str(CHECKER)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_checker_never_imports_kvnet():
    tree = ast.parse(CHECKER.read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in {"kvnet", "torch", "transformers"}}


def test_checker_passes_on_the_committed_vectors_and_weights(tiny_bf16):
    weights = tiny_bf16.resolved.folder / "model.safetensors"
    res = _run_checker("--weights", str(weights))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok:")


def _corrupt_hex(h: str) -> str:
    return h[:-1] + ("0" if h[-1] != "0" else "1")


# name -> (where in vectors.json, how to change the value there, the failure the checker must report)
CORRUPTIONS: dict[str, tuple[tuple[Any, ...], Any, str]] = {
    "model id": (("model_id", "model_id", "bf16"), _corrupt_hex, "model_id bf16"),
    "tokenization": (("tokenizer", "byte", "texts", 1, "ids", 8), lambda _: 10, "tokenize CRLF"),
    "manifest signature": (("manifest", "sig"), _corrupt_hex, "manifest signature"),
    "wire frame": (("wire", 2, "frame_hex"), _corrupt_hex, "frame pieces request"),
    "canonical case": (("canonical", "cases", 2, "hex"), lambda _: "d080", "canonical int 128"),
    "ignored config keys": (("config", "ignored_keys"), lambda keys: [*keys, "rope_theta"], "config ignored keys"),
    "receipt signature": (("payments", "receipts", 1, "sig"), _corrupt_hex, "receipt 2 signature"),
    "batch owed": (("payments", "batch_owed", 0, "amount"), lambda a: a + 1, "batch owed"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_checker_fails_on_a_corrupted_vector(name, tmp_path):
    where, change, expected = CORRUPTIONS[name]
    doc = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    parent = doc
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = change(parent[where[-1]])
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    res = _run_checker("--vectors", str(path))
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"FAIL: {expected}" in res.stdout


def test_checker_fails_on_corrupted_weights(tiny_bf16, tmp_path):
    weights = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_bf16.resolved.folder / "model.safetensors", weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte belongs to some tensor's data
    weights.write_bytes(bytes(data))
    res = _run_checker("--weights", str(weights))
    assert res.returncode == 1
    assert "FAIL: weights digest" in res.stdout


def test_checker_fails_on_a_corrupted_chain_file(tmp_path):
    doc = json.loads((DOCS / "chain-vectors.json").read_text())
    doc["cases"][2]["keys"][1]["key"] = _corrupt_hex(doc["cases"][2]["keys"][1]["key"])
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(doc))
    res = _run_checker("--chain", str(path))
    assert res.returncode == 1
    assert "FAIL: chain partial tail" in res.stdout
