"""Every manifest rule of docs/artifact.md, checked on parse.

Each case changes one field of the vector manifest and signs the result with the test key, so the
signature is valid and only the rule under test can refuse it (sign() would refuse most of these
before signing; a hostile publisher does not use our sign()).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import canonical, manifest

V = json.loads((Path(__file__).parents[1] / "docs" / "vectors.json").read_text(encoding="utf-8"))["manifest"]
KEY = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(V["private_key"]))
BODY: dict[str, Any] = canonical.decode(bytes.fromhex(V["body_hex"]))
NOW = BODY["created"]


def signed(body: dict[str, Any]) -> bytes:
    sig = KEY.sign(manifest.SIG_DOMAIN + canonical.encode(body))
    return canonical.encode({**body, "sig": sig})


def changed(**fields: Any) -> dict[str, Any]:
    return {**BODY, **fields}


def test_the_unchanged_vector_parses():
    assert manifest.parse(signed(BODY), now=NOW).id.hex() == V["manifest_id"]


REFUSED = {
    "kv_shape zero": (changed(kv_shape=[0, 2, 16]), "kv_shape"),
    "kv_shape over 4096": (changed(kv_shape=[2, 2, 4097]), "kv_shape"),
    "kv_shape bool": (changed(kv_shape=[2, True, 16]), "kv_shape"),
    "kv_shape two entries": (changed(kv_shape=[2, 32]), "kv_shape"),
    "block_size over 65536": (changed(block_size=65537, chain=BODY["chain"][:1]), "block_size"),
    "block_size zero": (changed(block_size=0), "block_size"),
    "piece_size over 1 MiB": (changed(piece_size=(1 << 20) + 1, pieces=BODY["pieces"][:1]), "piece_size"),
    "n_tokens zero": (changed(n_tokens=0, total_bytes=0, chain=[], pieces=[]), "n_tokens"),
    "n_tokens over 2^22": (changed(n_tokens=(1 << 22) + 1), "n_tokens"),
    "negative price": (changed(terms={"price_per_load": -1, "currency": "USD"}), "price_per_load"),
    "bool price": (changed(terms={"price_per_load": True, "currency": "USD"}), "terms"),
    "empty currency": (changed(terms={"price_per_load": 0, "currency": ""}), "currency"),
    "17-byte currency": (changed(terms={"price_per_load": 0, "currency": "X" * 17}), "currency"),
    "6 characters, 18 UTF-8 bytes": (changed(terms={"price_per_load": 0, "currency": "€" * 6}), "currency"),
    "extra terms key": (changed(terms={"price_per_load": 0, "currency": "USD", "x": 1}), "terms"),
    "missing terms key": (changed(terms={"price_per_load": 0}), "terms"),
    "expires equals created": (changed(expires=NOW), "expires"),
    "expires before created": (changed(expires=NOW - 1), "expires"),
    "negative created": (changed(created=-1, expires=0), "created"),
    "unknown source key": (changed(source={"author": "x"}), "source.author"),
    "title not str": (changed(source={"title": b"x"}), "source.title"),
    "short text_b3": (changed(source={"text_b3": bytes(31)}), "source.text_b3"),
    "profile value not str": (changed(profile={"device": 1}), "profile"),
    "unknown dtype": (changed(dtype="int8"), "dtype"),
    "version 2": (changed(v=2), "field v"),
    "total_bytes off by one": (changed(total_bytes=BODY["total_bytes"] + 1), "total_bytes"),
    "one chain key missing": (changed(chain=BODY["chain"][:-1]), "chain"),
    "one piece hash missing": (changed(pieces=BODY["pieces"][:-1]), "pieces"),
    "unknown field": (changed(extra=1), "unknown fields"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_rule_is_enforced_on_parse(case):
    body, field = REFUSED[case]
    with pytest.raises(manifest.ManifestError, match=field):
        manifest.parse(signed(body), now=NOW)


def test_currency_limit_counts_utf8_bytes():
    five_euros = changed(terms={"price_per_load": 0, "currency": "€" * 5})  # 15 bytes
    assert manifest.parse(signed(five_euros), now=NOW).manifest.terms.currency == "€" * 5


def test_expiry_is_reached_at_expires():
    raw = signed(BODY)
    assert manifest.parse(raw, now=BODY["expires"] - 1)
    with pytest.raises(manifest.ManifestError, match="expired"):
        manifest.parse(raw, now=BODY["expires"])
    assert manifest.parse(raw, now=BODY["expires"], allow_expired=True)
