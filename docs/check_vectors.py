"""Independent checker for docs/vectors.json and docs/chain-vectors.json.

Written from docs/artifact.md, docs/protocol.md, docs/payments.md and docs/audits.md alone: it NEVER
imports kvnet. It needs only the standard library and the `blake3`, `msgpack` (used only to split bytes
into values; every encoding is checked by the hand-written canonical encoder below) and `cryptography`
packages.

    python3 docs/check_vectors.py                                  # every vector except the weights bytes
    python3 docs/check_vectors.py --weights <tiny>/model.safetensors   # also recompute the weights digest

Exit status 0 when every vector is reproduced, 1 (listing each failure) otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

HERE = Path(__file__).resolve().parent

# --- constants copied from the spec (docs/artifact.md), not from kvnet ---------------------------
MODEL_DOMAIN = "kvnet/model/v2"
KV_LAYOUT = 1
RUN_DTYPES = ("bf16", "fp16", "fp32")
CONFIG_IGNORED = ("_name_or_path", "dtype", "initializer_range", "output_attentions", "output_hidden_states",
                  "return_dict", "torch_dtype", "transformers_version", "use_cache")
BYTE_TOKENIZER_NAME = "kvnet-byte-v2"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
HF_TOKENIZER_NAME = "kvnet-hf-v2"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
            "added_tokens.json", "tokenizer.model")
CHAIN_DOMAIN = b"kvnet/chain/v1\x00"
MANIFEST_DOMAIN = b"kvnet/manifest/v1\x00"
CHANNEL_DOMAIN = "kvnet/channel/v1"
RECEIPT_DOMAIN = b"kvnet/receipt/v1\x00"
BATCH_DOMAIN = "kvnet/settlement-batch/v1"
RECEIPT_FIELDS = ("channel", "cumulative", "currency", "lines", "nonce", "payee", "payer", "seq", "sig", "time", "v")
LINE_UNITS = {"hosting": "bytes", "license": "loads"}
MAX_RECEIPT_BYTES = 8192
MAX_LINES = 64
KV_DTYPE_SIZES = {"bf16": 2, "fp16": 2, "fp32": 4}
ST_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                  "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


# --- canonical msgpack, by hand ----------------------------------------------------------------

def _len_header(n: int, fix: int | None, fix_max: int, codes: tuple[int, ...]) -> bytes:
    """Shortest header for a length: fix form when it fits, else the 8/16/32-bit form (None = absent)."""
    if fix is not None and n <= fix_max:
        return bytes([fix | n])
    for code, width in zip(codes, (1, 2, 4)[-len(codes):], strict=True):
        if n < 1 << (8 * width):
            return bytes([code]) + n.to_bytes(width, "big")
    raise ValueError("too long for msgpack")


def _int(v: int) -> bytes:
    if 0 <= v <= 0x7F:
        return bytes([v])
    if -32 <= v < 0:
        return struct.pack(">b", v)
    if v >= 0:
        for code, fmt in ((0xCC, ">B"), (0xCD, ">H"), (0xCE, ">I"), (0xCF, ">Q")):
            if v < 1 << (8 * struct.calcsize(fmt)):
                return bytes([code]) + struct.pack(fmt, v)
    else:
        for code, fmt in ((0xD0, ">b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q")):
            if v >= -(1 << (8 * struct.calcsize(fmt) - 1)):
                return bytes([code]) + struct.pack(fmt, v)
    raise ValueError(f"integer {v} outside msgpack's range")


def enc(v: Any, allow_float: bool = False) -> bytes:
    """Canonical msgpack of v (docs/artifact.md, "Canonical msgpack")."""
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        return _int(v)
    if isinstance(v, float):
        if not allow_float or not math.isfinite(v):
            raise ValueError("float not allowed here")
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, str):
        raw = v.encode("utf-8")
        return _len_header(len(raw), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + raw
    if isinstance(v, bytes):
        return _len_header(len(v), None, 0, (0xC4, 0xC5, 0xC6)) + v
    if isinstance(v, list):
        return _len_header(len(v), 0x90, 15, (0xDC, 0xDD)) + b"".join(enc(x, allow_float) for x in v)
    if isinstance(v, dict):
        keys = sorted(v, key=lambda k: k.encode("utf-8"))
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("map keys must be str")
        return _len_header(len(v), 0x80, 15, (0xDE, 0xDF)) + b"".join(
            enc(k) + enc(v[k], allow_float) for k in keys)
    raise ValueError(f"cannot encode {type(v).__name__}")


def dec(data: bytes) -> Any:
    """Decode canonical msgpack: msgpack splits the bytes, then the re-encoding must be identical."""
    value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if enc(value) != data:
        raise ValueError("not canonical")
    return value


def from_typed(t: dict[str, Any]) -> Any:
    """The typed JSON form of the vectors file -> a value."""
    ((tag, x),) = t.items()
    return {"nil": lambda: None, "bool": lambda: x, "int": lambda: x, "str": lambda: x,
            "bin": lambda: bytes.fromhex(x), "array": lambda: [from_typed(i) for i in x],
            "map": lambda: {k: from_typed(i) for k, i in x.items()}}[tag]()


# --- the formats, from the spec ----------------------------------------------------------------

def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def config_value(text: str) -> dict[str, Any]:
    """config.json text -> the map that enters the model id."""
    if text.startswith("\ufeff"):
        raise ValueError("BOM")
    value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    out = {k: v for k, v in value.items() if k not in CONFIG_IGNORED}
    enc(out, allow_float=True)  # refuses infinities and out-of-range integers
    return out


def byte_identity_map() -> dict[str, Any]:
    return {"name": BYTE_TOKENIZER_NAME, "special": list(SPECIALS)}


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def byte_chat(messages: list[list[str]], add_generation_prompt: bool) -> list[int]:
    start, end = 256 + SPECIALS.index("<|im_start|>"), 256 + SPECIALS.index("<|im_end|>")
    ids: list[int] = []
    for role, content in messages:
        ids += [start, *byte_encode(role + "\n"), *byte_encode(content), end, *byte_encode("\n")]
    if add_generation_prompt:
        ids += [start, *byte_encode("assistant\n")]
    return ids


def model_id_preimage(config: dict[str, Any], weights: bytes, dtype: str, tokenizer: bytes) -> bytes:
    return enc({"domain": MODEL_DOMAIN, "config": config, "weights": weights, "dtype": dtype,
                "tokenizer": tokenizer, "kv_layout": KV_LAYOUT}, allow_float=True)


def safetensors_tensors(path: Path) -> list[tuple[str, str, list[int], bytes]]:
    """(name, dtype, shape, raw bytes) of every tensor, by plain file I/O."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[8 + n + begin : 8 + n + end]
        if len(raw) != math.prod(info["shape"]) * ST_DTYPE_SIZES[info["dtype"]]:
            raise ValueError(f"tensor {name}: size does not match dtype and shape")
        out.append((name, info["dtype"], list(info["shape"]), raw))
    return sorted(out, key=lambda t: t[0].encode("utf-8"))


def weights_digest(tensors: list[tuple[str, str, list[int], bytes]]) -> bytes:
    h = blake3.blake3()
    for name, dtype, shape, raw in tensors:
        h.update(enc({"name": name, "dtype": dtype, "shape": shape}))
        h.update(raw)
    return h.digest()


def chain_keys(model_id: bytes, tokens: list[int], block_size: int) -> list[tuple[int, bytes]]:
    key = b3(CHAIN_DOMAIN + model_id)
    out = []
    for s in range(0, len(tokens), block_size):
        block = tokens[s : s + block_size]
        key = b3(key + struct.pack(f"<{len(block)}I", *block))
        out.append((s + len(block), key))
    return out


def frame(msg: dict[str, Any]) -> bytes:
    payload = enc(msg)
    return struct.pack(">I", len(payload)) + payload


# --- the checks ---------------------------------------------------------------------------------

class Checker:
    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def eq(self, what: str, got: Any, want: Any) -> None:
        if got == want:
            self.passed += 1
        else:
            self.failures.append(f"{what}: got {str(got)[:120]}, want {str(want)[:120]}")

    def refuses(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # any refusal will do: the point is that nothing is accepted
            self.passed += 1
            return
        self.failures.append(f"{what}: was accepted, must be refused")

    def run(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # a crash in one section must not hide the others
            self.failures.append(f"{what}: {type(exc).__name__}: {exc}")


def check_canonical(c: Checker, v: dict[str, Any]) -> None:
    for case in v["cases"]:
        value = from_typed(case["value"])
        c.eq(f"canonical {case['name']}", enc(value).hex(), case["hex"])
        c.eq(f"canonical decode {case['name']}", dec(bytes.fromhex(case["hex"])), value)
    for name, hx in v["non_canonical_hex"].items():
        c.refuses(f"non-canonical {name}", lambda hx=hx: dec(bytes.fromhex(hx)))


def check_config(c: Checker, v: dict[str, Any]) -> None:
    c.eq("config ignored keys", sorted(v["ignored_keys"]), sorted(CONFIG_IGNORED))
    for i, case in enumerate(v["cases"]):
        c.eq(f"config case {i}", enc(config_value(case["json"]), allow_float=True).hex(), case["hex"])
    for name, text in v["refused"].items():
        c.refuses(f"config refused {name}", lambda text=text: config_value(text))


def check_model_id(c: Checker, v: dict[str, Any], weights: Path | None) -> None:
    config = config_value(v["config_json"])
    c.eq("model config", enc(config, allow_float=True).hex(), v["config_hex"])
    tok = b3(enc(byte_identity_map()))
    c.eq("model tokenizer identity", tok.hex(), v["tokenizer_identity"])
    digest = bytes.fromhex(v["weights_digest"])
    for t in v["tensors"]:
        c.eq(f"tensor header {t['name']}", enc({"name": t["name"], "dtype": t["dtype"], "shape": t["shape"]}).hex(),
             t["header_hex"])
    c.eq("model preimage bf16", model_id_preimage(config, digest, "bf16", tok).hex(), v["preimage_bf16_hex"])
    c.eq("model kv_layout", v["kv_layout"], KV_LAYOUT)
    for dtype in RUN_DTYPES:
        c.eq(f"model_id {dtype}", b3(model_id_preimage(config, digest, dtype, tok)).hex(), v["model_id"][dtype])
    if weights is not None:
        c.eq("weights file BLAKE3", b3(weights.read_bytes()).hex(), v["weights_file_b3"])
        tensors = safetensors_tensors(weights)
        c.eq("weights tensors", [(n, d, s, b3(r).hex()) for n, d, s, r in tensors],
             [(t["name"], t["dtype"], t["shape"], t["data_b3"]) for t in v["tensors"]])
        c.eq("weights digest", weights_digest(tensors).hex(), v["weights_digest"])


def check_tokenizer(c: Checker, v: dict[str, Any]) -> None:
    byte = v["byte"]
    c.eq("byte specials", [(s["token"], s["id"]) for s in byte["special_tokens"]],
         [(t, 256 + i) for i, t in enumerate(SPECIALS)])
    c.eq("byte identity map", from_typed(byte["identity_map"]), byte_identity_map())
    c.eq("byte identity map bytes", enc(byte_identity_map()).hex(), byte["identity_map_hex"])
    c.eq("byte identity", b3(enc(byte_identity_map())).hex(), byte["identity"])
    for t in byte["texts"]:
        c.eq(f"tokenize {t['name']}", byte_encode(bytes.fromhex(t["utf8_hex"]).decode("utf-8")), t["ids"])
    chat = byte["chat"]
    c.eq("chat", byte_chat(chat["messages"], chat["add_generation_prompt"]), chat["ids"])
    hf = v["hf_example"]
    files = {k: b3(bytes.fromhex(x)) for k, x in hf["files_hex"].items() if k in HF_FILES}
    hf_map = enc({"name": HF_TOKENIZER_NAME, "files": files})
    c.eq("hf identity map", hf_map.hex(), hf["identity_map_hex"])
    c.eq("hf identity", b3(hf_map).hex(), hf["identity"])


def check_chain(c: Checker, v: dict[str, Any], path: Path) -> None:
    c.eq("chain domain", bytes.fromhex(v["domain_hex"]), CHAIN_DOMAIN)
    cv = json.loads(path.read_text(encoding="utf-8"))
    mid = bytes.fromhex(cv["model_id"])
    c.eq("chain root", b3(CHAIN_DOMAIN + mid).hex(), cv["root_key"])
    for case in cv["cases"]:
        got = [{"n_tokens": n, "key": k.hex()} for n, k in chain_keys(mid, case["tokens"], case["block_size"])]
        c.eq(f"chain {case['name']}", got, case["keys"])


def _check_manifest_body(c: Checker, v: dict[str, Any], body: dict[str, Any]) -> None:
    """The consistency rules of docs/artifact.md, recomputed from the document and artifact bytes."""
    layers, heads, dim = body["kv_shape"]
    artifact = bytes.fromhex(v["artifact_hex"])
    tokens = byte_encode(bytes.fromhex(v["document_utf8_hex"]).decode("utf-8"))
    c.eq("manifest n_tokens", body["n_tokens"], len(tokens))
    c.eq("manifest total_bytes", body["total_bytes"], len(tokens) * layers * 2 * heads * dim
         * KV_DTYPE_SIZES[body["dtype"]])
    c.eq("manifest artifact length", len(artifact), body["total_bytes"])
    c.eq("manifest chain", body["chain"], [k for _, k in chain_keys(body["model_id"], tokens, body["block_size"])])
    ps = body["piece_size"]
    c.eq("manifest pieces", body["pieces"], [b3(artifact[i : i + ps]) for i in range(0, len(artifact), ps)])
    c.eq("manifest text_b3", body["source"]["text_b3"], b3(bytes.fromhex(v["document_utf8_hex"])))
    c.eq("manifest terms keys", sorted(body["terms"]), ["currency", "price_per_load"])


def check_manifest(c: Checker, v: dict[str, Any], model_id: str) -> None:
    body = from_typed(v["body"])
    c.eq("manifest model_id", body["model_id"].hex(), model_id)
    _check_manifest_body(c, v, body)
    body_bytes = enc(body)
    c.eq("manifest body bytes", body_bytes.hex(), v["body_hex"])
    c.eq("manifest signing domain", bytes.fromhex(v["signing_domain_hex"]), MANIFEST_DOMAIN)
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["private_key"]))
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    c.eq("manifest public key", pub.hex(), v["public_key"])
    c.eq("manifest publisher", body["publisher"], pub)
    sig = key.sign(MANIFEST_DOMAIN + body_bytes)
    c.eq("manifest signature", sig.hex(), v["sig"])
    Ed25519PublicKey.from_public_bytes(pub).verify(bytes.fromhex(v["sig"]), MANIFEST_DOMAIN + body_bytes)
    signed = enc({**body, "sig": sig})
    c.eq("manifest signed bytes", signed.hex(), v["signed_hex"])
    c.eq("manifest id", b3(signed).hex(), v["manifest_id"])


def check_wire(c: Checker, frames: list[dict[str, Any]], man: dict[str, Any]) -> None:
    by_name = {f["name"]: f for f in frames}
    for f in frames:
        c.eq(f"frame {f['name']}", frame(from_typed(f["message"])).hex(), f["frame_hex"])
    signed = bytes.fromhex(man["signed_hex"])
    body = from_typed(man["body"])
    n = len(body["pieces"])
    offer = from_typed(by_name["offer response"]["message"])["offers"][0]
    c.eq("offer carries the signed manifest", offer["manifest"], signed)
    c.eq("offer bitfield (LSB first)", offer["have"], bytes([(1 << n) - 1]))
    c.eq("offer request key", from_typed(by_name["offer request"]["message"])["key"], body["chain"][0])
    c.eq("pieces request manifest", from_typed(by_name["pieces request"]["message"])["manifest"],
         bytes.fromhex(man["manifest_id"]))
    head = by_name["piece header"]
    raw = bytes.fromhex(head["raw_bytes_after_hex"])
    c.eq("piece header length", from_typed(head["message"])["n"], len(raw))
    c.eq("piece bytes", b3(raw), body["pieces"][0])


def _public(private_hex: str) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def receipt_problem(raw: bytes) -> str | None:
    """The stateless rules of docs/payments.md, "Receipt": None if `raw` is a valid receipt, else the rule."""
    if len(raw) > MAX_RECEIPT_BYTES:
        return "oversized"
    try:
        d = dec(raw)
    except ValueError:
        return "non_canonical"
    if not isinstance(d, dict) or tuple(sorted(d)) != RECEIPT_FIELDS or d["v"] != 1:
        return "malformed"
    channel = {"domain": CHANNEL_DOMAIN, "payer": d["payer"], "payee": d["payee"], "currency": d["currency"],
               "nonce": d["nonce"]}
    if b3(enc(channel)) != d["channel"]:
        return "wrong_channel"
    lines = d["lines"]
    if not 0 < len(lines) <= MAX_LINES or any(set(ln) != {"manifest", "kind", LINE_UNITS.get(ln.get("kind")),
                                                          "amount"} for ln in lines):
        return "malformed"
    body = {k: v for k, v in d.items() if k != "sig"}
    try:
        Ed25519PublicKey.from_public_bytes(d["payer"]).verify(d["sig"], RECEIPT_DOMAIN + enc(body))
    except Exception:
        return "bad_signature"
    added = sum(ln["amount"] for ln in lines)
    if added > d["cumulative"] or (d["seq"] == 1 and added != d["cumulative"]):
        return "lines_do_not_add_up"
    return None


def next_problem(prev_raw: bytes, raw: bytes) -> str | None:
    """The rules between a channel's latest receipt and the next one (docs/payments.md, "Accepting")."""
    prev, r = dec(prev_raw), dec(raw)
    if raw == prev_raw:
        return "replayed"
    if r["seq"] <= prev["seq"]:
        return "repeated_sequence"
    if r["seq"] != prev["seq"] + 1:
        return "skipped_sequence"
    if r["cumulative"] < prev["cumulative"]:
        return "lower_cumulative"
    if r["cumulative"] != prev["cumulative"] + sum(ln["amount"] for ln in r["lines"]):
        return "lines_do_not_add_up"
    return None


def check_payments(c: Checker, v: dict[str, Any], man: dict[str, Any]) -> None:
    payer, payee = _public(v["payer_private_key"]), _public(v["payee_private_key"])
    channel = from_typed(v["channel"])
    c.eq("channel map", channel, {"domain": CHANNEL_DOMAIN, "payer": payer, "payee": payee, "currency": "USD",
                                  "nonce": channel["nonce"]})
    c.eq("channel bytes", enc(channel).hex(), v["channel_hex"])
    c.eq("channel id", b3(enc(channel)).hex(), v["channel_id"])
    c.eq("receipt signing domain", bytes.fromhex(v["signing_domain_hex"]), RECEIPT_DOMAIN)
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["payer_private_key"]))
    terms = from_typed(man["body"])["terms"]
    cumulative, prev = 0, None
    for i, rv in enumerate(v["receipts"], start=1):
        body = from_typed(rv["body"])
        c.eq(f"receipt {i} channel fields", {k: body[k] for k in ("payer", "payee", "currency", "nonce")},
             {k: channel[k] for k in ("payer", "payee", "currency", "nonce")})
        c.eq(f"receipt {i} channel id", body["channel"].hex(), v["channel_id"])
        c.eq(f"receipt {i} seq", body["seq"], i)
        for ln in body["lines"]:
            want = (ln["bytes"] * v["fee_per_mib"] + (1 << 20) - 1) // (1 << 20) if ln["kind"] == "hosting" \
                else ln["loads"] * terms["price_per_load"]
            c.eq(f"receipt {i} line price", ln["amount"], want)
            c.eq(f"receipt {i} line manifest", ln["manifest"].hex(), man["manifest_id"])
        cumulative += sum(ln["amount"] for ln in body["lines"])
        c.eq(f"receipt {i} cumulative", body["cumulative"], cumulative)
        c.eq(f"receipt {i} body bytes", enc(body).hex(), rv["body_hex"])
        sig = key.sign(RECEIPT_DOMAIN + enc(body))
        c.eq(f"receipt {i} signature", sig.hex(), rv["sig"])
        signed = enc({**body, "sig": sig})
        c.eq(f"receipt {i} signed bytes", signed.hex(), rv["signed_hex"])
        c.eq(f"receipt {i} id", b3(signed).hex(), rv["receipt_id"])
        c.eq(f"receipt {i} valid", receipt_problem(bytes.fromhex(rv["signed_hex"])), None)
        if prev is not None:
            c.eq(f"receipt {i} follows {i - 1}", next_problem(prev, signed), None)
        prev = signed
    second = bytes.fromhex(v["receipts"][1]["signed_hex"])
    for rule, hx in v["refused_after_receipt_2"].items():
        raw = bytes.fromhex(hx)
        c.eq(f"refused {rule}", receipt_problem(raw) or next_problem(second, raw), rule)
    tampered = bytearray(second)
    tampered[second.index(dec(second)["sig"])] ^= 1  # one bit of the signature
    c.eq("tampered receipt", receipt_problem(bytes(tampered)), "bad_signature")
    check_batch(c, v)
    for case in v["hosting_cost"]:
        c.eq(f"hosting cost {case['bytes']} B at {case['fee_per_mib']}",
             (case["bytes"] * case["fee_per_mib"] + (1 << 20) - 1) // (1 << 20), case["cost"])
    check_payment_wire(c, v)
    c.eq("payment limits", v["limits"], {"max_receipt_bytes": MAX_RECEIPT_BYTES, "max_lines": MAX_LINES,
                                         "nonce_bytes": 16, "max_currency_bytes": 16})


PAYMENT_FRAME_KEYS = {  # docs/protocol.md, "Payments on requests" and `/kvnet/receipts/1.0.0`
    "paid pieces request": {"v", "manifest", "ranges", "receipt"},
    "paid bulk grant request": {"v", "manifest", "ranges", "mode", "receipt"},
    "bulk grant answer, part granted": {"v", "host", "port", "token", "fingerprint", "ttl", "granted"},
    "pieces done, part granted": {"done", "granted"},
    "payment_required": {"v", "err", "msg"},
    "payment_required license": {"v", "err", "msg", "license"},
    "receipt_refused skipped_sequence": {"v", "err", "msg", "rule", "seq", "channel"},
    "receipts pay": {"v", "op", "receipt"},
    "receipts pay answer": {"v", "ok"},
    "receipts collect": {"v", "op", "publisher", "after"},
    "receipts collect answer": {"v", "receipts", "next", "more"},
    "forbidden": {"v", "err", "msg"},
}


def check_payment_wire(c: Checker, v: dict[str, Any]) -> None:
    """Each payment message's frame, its fields, and that the receipts it carries are the vectors' own."""
    signed = [bytes.fromhex(r["signed_hex"]) for r in v["receipts"]]
    frames = {f["name"]: f for f in v["wire"]}
    c.eq("payment frames", set(frames), set(PAYMENT_FRAME_KEYS))
    for name, f in frames.items():
        msg = from_typed(f["message"])
        c.eq(f"frame {name}", frame(msg).hex(), f["frame_hex"])
        c.eq(f"frame {name} fields", set(msg), PAYMENT_FRAME_KEYS[name])
        carried = msg.get("receipt") or msg.get("receipts") or []
        c.eq(f"frame {name} carries 1..4 vector receipts", all(r in signed for r in carried)
             and (name == "receipts collect answer" or len(carried) <= 4), True)
        for r in carried:
            c.eq(f"frame {name} receipt valid", receipt_problem(r), None)
    c.eq("collect asks for the payee", from_typed(frames["receipts collect"]["message"])["publisher"],
         _public(v["payee_private_key"]))
    refused = from_typed(frames["receipt_refused skipped_sequence"]["message"])
    c.eq("refusal names the channel", refused["channel"].hex(), v["channel_id"])


def check_batch(c: Checker, v: dict[str, Any]) -> None:
    """A settlement batch, checked as a settlement service would: nothing but the file's bytes."""
    batch = dec(bytes.fromhex(v["batch_hex"]))
    c.eq("batch keys", sorted(batch), ["channels", "created", "domain", "payee", "v"])
    c.eq("batch domain", (batch["domain"], batch["v"]), (BATCH_DOMAIN, 1))
    c.eq("batch receipts", [r.hex() for r in batch["channels"][0]], [r["signed_hex"] for r in v["receipts"]])
    owed: dict[tuple[str, str], int] = {}
    for receipts_of_channel in batch["channels"]:
        for i, raw in enumerate(receipts_of_channel):
            c.eq(f"batch receipt {i} valid", receipt_problem(raw), None)
            c.eq(f"batch receipt {i} payee", dec(raw)["payee"], batch["payee"])
            if i:
                c.eq(f"batch receipt {i} follows", next_problem(receipts_of_channel[i - 1], raw), None)
        latest = dec(receipts_of_channel[-1])
        k = (latest["payer"].hex(), latest["currency"])
        owed[k] = owed.get(k, 0) + latest["cumulative"]
    c.eq("batch owed", [{"payer": p, "currency": cur, "amount": a} for (p, cur), a in sorted(owed.items())],
         v["batch_owed"])


PROOF_DOMAIN = "kvnet/fraud-proof"
PROOF_FIELDS = ("block", "domain", "manifest", "recomputed", "tokens", "v")
MAX_PROOF_BYTES = 4 * 2**20 + 4 * 2**22 + 2**20


def proof_problem(raw: bytes) -> str | None:
    """The model-free rules of docs/audits.md, "Verifying a proof", in order: None, or the rule broken."""
    if len(raw) > MAX_PROOF_BYTES:
        return "size"
    try:
        d = dec(raw)
    except ValueError:
        return "encoding"
    if not isinstance(d, dict) or tuple(sorted(d)) != PROOF_FIELDS:
        return "fields"
    if (d["domain"], d["v"]) != (PROOF_DOMAIN, 1):
        return "version"
    try:
        man = dec(d["manifest"])
        body = {k: x for k, x in man.items() if k != "sig"}
        Ed25519PublicKey.from_public_bytes(man["publisher"]).verify(man["sig"], MANIFEST_DOMAIN + enc(body))
    except Exception:
        return "manifest"
    j, bs, n = d["block"], man["block_size"], man["n_tokens"]
    if not 0 <= j < len(man["chain"]):
        return "block"
    end = min((j + 1) * bs, n)
    if len(d["tokens"]) != 4 * end:
        return "tokens"
    tokens = list(struct.unpack(f"<{end}I", d["tokens"]))
    if [k for _, k in chain_keys(man["model_id"], tokens, bs)] != man["chain"][: j + 1]:
        return "chain"
    if len(d["recomputed"]) != man["kv_shape"][0] or any(len(h) != 32 for h in d["recomputed"]):
        return "hashes"
    return None


RECORD_DOMAIN = "kvnet/fraud-proof-record"
RECORD_SIG_DOMAIN = b"kvnet/fraud-proof-record/v1\x00"
RECORD_FIELDS = ("author", "domain", "proof", "sig", "v")
MAX_RECORD_BYTES = MAX_PROOF_BYTES + 1024


def record_problem(raw: bytes) -> str | None:
    """The proof record's rules of docs/audits.md, "The proof record", then the proof's own: None, or
    the rule broken."""
    if len(raw) > MAX_RECORD_BYTES:
        return "record_size"
    try:
        d = dec(raw)
    except ValueError:
        return "record_encoding"
    if (not isinstance(d, dict) or tuple(sorted(d)) != RECORD_FIELDS or not isinstance(d["author"], bytes)
            or len(d["author"]) != 32 or not isinstance(d["proof"], bytes) or not isinstance(d["sig"], bytes)):
        return "record_fields"
    if (d["domain"], d["v"]) != (RECORD_DOMAIN, 1):
        return "record_version"
    body = {k: x for k, x in d.items() if k != "sig"}
    try:
        Ed25519PublicKey.from_public_bytes(d["author"]).verify(d["sig"], RECORD_SIG_DOMAIN + enc(body))
    except Exception:
        return "record_sig"
    return proof_problem(d["proof"])


def check_proof_record(c: Checker, v: dict[str, Any], proof_hex: str) -> None:
    raw = bytes.fromhex(v["record_hex"])
    rec = from_typed(v["record"])
    c.eq("record bytes", enc(rec).hex(), v["record_hex"])
    c.eq("record proof", rec["proof"].hex(), proof_hex)
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["author_private_key"]))
    author = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    c.eq("record author", rec["author"].hex(), author.hex())
    body = {k: x for k, x in rec.items() if k != "sig"}
    c.eq("record signing bytes", (RECORD_SIG_DOMAIN + enc(body)).hex(), v["signing_bytes_hex"])
    c.eq("record signature (deterministic Ed25519)", key.sign(RECORD_SIG_DOMAIN + enc(body)).hex(), rec["sig"].hex())
    c.eq("record valid", record_problem(raw), None)
    c.eq("record limits", v["limits"], {"domain": RECORD_DOMAIN, "v": 1, "sig_domain_hex": RECORD_SIG_DOMAIN.hex(),
                                        "max_record_bytes": MAX_RECORD_BYTES, "dht_record_max_bytes": 196608})
    for rule, bad in v["refused"].items():
        c.eq(f"record refused by rule {rule}", record_problem(bytes.fromhex(bad)), rule)


def check_fraud_proof(c: Checker, v: dict[str, Any], man: dict[str, Any]) -> None:
    raw = bytes.fromhex(v["proof_hex"])
    proof = from_typed(v["proof"])
    c.eq("proof bytes", enc(proof).hex(), v["proof_hex"])
    c.eq("proof id", b3(raw).hex(), v["proof_id"])
    c.eq("proof manifest", proof["manifest"].hex(), man["signed_hex"])
    c.eq("proof tokens", list(struct.unpack(f"<{len(v['tokens'])}I", proof["tokens"])), v["tokens"])
    c.eq("proof valid", proof_problem(raw), None)
    c.eq("proof limits", v["limits"], {"domain": PROOF_DOMAIN, "v": 1, "max_proof_bytes": MAX_PROOF_BYTES})
    for rule, bad in v["refused"].items():
        c.eq(f"proof refused by rule {rule}", proof_problem(bytes.fromhex(bad)), rule)
    check_proof_record(c, v["record"], v["proof_hex"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=Path, default=HERE / "vectors.json")
    ap.add_argument("--chain", type=Path, default=HERE / "chain-vectors.json")
    ap.add_argument("--weights", type=Path, help="the tiny model's model.safetensors, to recompute its digest")
    args = ap.parse_args(argv)
    c = Checker()
    try:
        v = json.loads(args.vectors.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"FAIL: cannot read {args.vectors}: {exc}")
        return 1
    c.run("canonical", lambda: check_canonical(c, v["canonical"]))
    c.run("config", lambda: check_config(c, v["config"]))
    c.run("model_id", lambda: check_model_id(c, v["model_id"], args.weights))
    c.run("tokenizer", lambda: check_tokenizer(c, v["tokenizer"]))
    c.run("chain", lambda: check_chain(c, v["chain"], args.chain))
    c.run("manifest", lambda: check_manifest(c, v["manifest"], v["model_id"]["model_id"]["bf16"]))
    c.run("wire", lambda: check_wire(c, v["wire"], v["manifest"]))
    c.run("payments", lambda: check_payments(c, v["payments"], v["manifest"]))
    c.run("fraud_proof", lambda: check_fraud_proof(c, v["fraud_proof"], v["manifest"]))
    for f in c.failures:
        print(f"FAIL: {f}")
    if c.failures:
        print(f"{len(c.failures)} failed, {c.passed} passed")
        return 1
    print(f"ok: {c.passed} checks passed" + ("" if args.weights else " (weights bytes not checked: no --weights)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
