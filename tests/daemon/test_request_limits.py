"""The agent socket's request limits beyond the body size (docs/security.md, "The agent socket"): JSON
nesting, token ids and prompt length on the kvnet endpoints, title length, unknown fields. Each is a 400
in the OpenAI error shape (deep JSON was a 500, an over-long lookup and a 500 KB title were accepted),
and the node answers the next request. Runs on the session's node (tests/daemon/conftest.py)."""

from __future__ import annotations

import json

from kvnet.daemon.app import MAX_IGNORED_PARAMS, MAX_JSON_DEPTH, MAX_TITLE_CHARS


def _nested(levels: int) -> object:
    x: object = 1
    for _ in range(levels):
        x = [x]
    return x


def _error(r, code: str | None = None) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code
    return err["message"]


def _completion(c, **extra):
    return c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1, **extra})


def test_json_nesting_is_bounded(node):
    with node.http() as c:
        assert _completion(c, metadata=_nested(MAX_JSON_DEPTH - 1)).status_code == 200  # depth 64: the body + 63
        assert "nests" in _error(_completion(c, metadata=_nested(MAX_JSON_DEPTH)), "invalid_json")
        # past the decoder's own recursion limit (was a 500 RecursionError)
        r = c.post("/v1/kv/lookup", content=b"[" * 20000, headers={"content-type": "application/json"})
        _error(r, "invalid_json")
        assert _completion(c).status_code == 200


def test_kvnet_endpoints_check_tokens_like_generation(node):
    with node.http() as c:
        ctx = c.get("/v1/models").json()["data"][0]["kvnet"]["context_tokens"]
        assert "context" in _error(c.post("/v1/kv/lookup", json={"tokens": [7] * (ctx + 1)}),
                                   "context_length_exceeded")
        for bad in (-1, 2**40):
            assert "token ids" in _error(c.post("/v1/kv/lookup", json={"tokens": [5, bad]}))
            assert "token ids" in _error(c.post("/v1/kv/fetch", json={"tokens": [5, bad]}))
        assert c.post("/v1/kv/lookup", json={"tokens": [7] * ctx}).status_code == 200


def test_title_and_unknown_fields_are_bounded(node):
    with node.http() as c:
        msg = _error(c.post("/v1/kv/publish", json={"text": "a title test", "title": "t" * (MAX_TITLE_CHARS + 1)}))
        assert str(MAX_TITLE_CHARS) in msg
        ok = c.post("/v1/kv/publish", json={"text": "a title test", "title": "t" * MAX_TITLE_CHARS})
        assert ok.status_code == 200, ok.text
        many = {f"x{i}": 1 for i in range(MAX_IGNORED_PARAMS + 1)}
        assert str(MAX_IGNORED_PARAMS) in _error(_completion(c, **many))
        r = _completion(c, **dict(list(many.items())[:MAX_IGNORED_PARAMS]))
        assert r.status_code == 200 and len(r.json()["kvnet"]["ignored_params"]) == MAX_IGNORED_PARAMS
        assert len(json.dumps(r.json()["kvnet"]["ignored_params"])) < 1024
