"""Two real kvnet-node processes: A publishes a document for chat; B's agent asks its own question over
it through /v1/chat/completions, and B reuses A's KV over the network: fetched, verified, cached
tokens reported, and the answer token-exact against a full prefill."""

from __future__ import annotations

import time

from kvnet.daemon.chat import document_prefix
from kvnet.tokenizer import encode_chat
from tests.daemon.nodes import start, write_config

DOC = ("Section 4.2: a provider that serves a corrupt piece is scored down and never asked again. " * 9).strip()
QUESTION = "What happens to a provider that serves a corrupt piece?"


def test_b_reuses_a_document_a_published(tmp_path, tiny_fp32):
    a = start(write_config(tmp_path / "a"))
    try:
        b = start(write_config(tmp_path / "b", extra=f'bootstrap = ["{a.addr}"]', publish_on_miss=True))
        try:
            with a.http() as ca, b.http() as cb:
                pub = ca.post("/v1/kv/publish", json={"text": DOC, "for_chat": True, "title": "s4.2"}).json()
                plain = ca.post("/v1/kv/publish", json={"text": PLAIN, "title": "plain"}).json()
                messages = [{"role": "system", "content": DOC}, {"role": "user", "content": QUESTION}]
                deadline = time.monotonic() + 60
                while True:  # A announces in the background: wait until B's lookup sees it
                    hit = cb.post("/v1/kv/lookup", json={"messages": messages}).json()
                    if hit["network"] is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert hit["local"] is None
                assert hit["network"]["manifest_id"] == pub["manifest_id"]
                assert hit["network"]["offers"][0]["peer"] == a.ready["peer_id"]
                r = cb.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                          "max_tokens": 16}).json()
                peers = cb.get("/v1/peers").json()["peers"]
                held = cb.get("/v1/kv").json()["artifacts"]
                fetched = _fetch_by_id(cb, plain["manifest_id"])
                miss = _publish_on_miss(cb)
        finally:
            assert b.stop() == 0
    finally:
        assert a.stop() == 0
    tok = tiny_fp32.tokenizer
    assert pub["n_tokens"] == len(document_prefix(tok, DOC))
    k = r["kvnet"]
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == pub["n_tokens"] > 0
    assert k["source"] == "network" and k["manifest_id"] == pub["manifest_id"]
    assert k["providers"] == [a.ready["peer_id"]] and k["bytes_fetched"] > 0
    assert k["price_paid"] == 0
    ids = encode_chat(tok, [("system", DOC), ("user", QUESTION)])
    got = k["token_ids"]
    assert got == tiny_fp32.generate_from(None, ids, len(got)).tokens
    assert a.ready["peer_id"] in [p["peer_id"] for p in peers]
    assert [(h["manifest_id"], h["complete"]) for h in held] == [(pub["manifest_id"], True)]
    assert fetched["manifest_id"] == plain["manifest_id"] and fetched["fetched"] == plain["pieces"]
    assert fetched["already_had"] == 0 and fetched["price_paid"] == 0
    assert list(fetched["providers"]) == [a.ready["peer_id"]]
    first, second, n_tokens = miss
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert n_tokens == len(document_prefix(tok, OTHER_DOC))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == n_tokens
    assert second["kvnet"]["source"] == "local"


PLAIN = "A plain document, fetched by its manifest id through /v1/kv/fetch. " * 5


def _fetch_by_id(cb, mid: str) -> dict:
    """POST /v1/kv/fetch by id, retried while A's announcement of it is not out yet (404)."""
    deadline = time.monotonic() + 60
    while True:
        r = cb.post("/v1/kv/fetch", json={"manifest_id": mid})
        if r.status_code != 404 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return r.json()
        time.sleep(0.5)


OTHER_DOC = "Appendix B lists every limit a node enforces, with its default value. " * 6


def _publish_on_miss(cb) -> tuple[dict, dict, int]:
    """B (publish_on_miss) answers a chat over a document nobody published, then publishes its system turn:
    the next question over it reuses it."""
    def ask(q: str) -> dict:
        return cb.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": [
            {"role": "system", "content": OTHER_DOC}, {"role": "user", "content": q}]}).json()

    first = ask("Which appendix lists the limits?")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        arts = [a for a in cb.get("/v1/kv").json()["artifacts"] if a["title"] == "chat system prompt"]
        if arts and arts[0]["complete"]:
            break
        time.sleep(0.3)
    return first, ask("And what else?"), arts[0]["n_tokens"]
