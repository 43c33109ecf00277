"""The agent socket of a real kvnet-node: OpenAI-compatible completions and chat (plain and streaming),
reuse of published KV (token-exact against a full prefill), documents published for chat, the kvnet
endpoints, errors in the OpenAI shape, the official `openai` client, metrics."""

from __future__ import annotations

import json
import os
import stat

import httpx
import openai
import pytest

from kvnet.daemon.chat import document_prefix
from kvnet.tokenizer import encode_chat

DOC = ("kvnet shares the KV caches of documents between machines. " * 12).strip()
CHAT_DOC = ("The treaty of the seven rivers set the border along the eastern bank. " * 8).strip()


def ref_tokens(engine, prompt: list[int], n: int) -> list[int]:
    """Tokens of a full prefill of `prompt` followed by greedy decoding (no reuse at all)."""
    return engine.generate_from(None, prompt, n).tokens


def events(resp: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def test_models_and_status(node, tiny_fp32):
    with node.http() as c:
        models = c.get("/v1/models").json()
        status = c.get("/v1/status").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert status["model"]["model_id"] == tiny_fp32.model_id.hex()
    assert status["peer_id"] == node.addr.rsplit("/", 1)[1]
    mode = os.stat(node.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_completion_reuses_a_published_document_token_exactly(node, tiny_fp32):
    tok = tiny_fp32.tokenizer
    with node.http() as c:
        pub = c.post("/v1/kv/publish", json={"text": DOC, "title": "doc"}).json()
        assert pub["n_tokens"] == len(tok.encode(DOC)) and not pub["already_published"]
        again = c.post("/v1/kv/publish", json={"text": DOC, "title": "doc"}).json()
        assert again["already_published"] and again["manifest_id"] == pub["manifest_id"]
        listed = c.get("/v1/kv").json()["artifacts"]
        assert pub["manifest_id"] in [a["manifest_id"] for a in listed]
        prompt = DOC + " Question: what does kvnet share?"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                            "temperature": 0}).json()
    ids = tok.encode(prompt)
    assert r["object"] == "text_completion"
    assert r["usage"]["prompt_tokens"] == len(ids)
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == pub["n_tokens"]
    assert r["kvnet"]["manifest_id"] == pub["manifest_id"] and r["kvnet"]["source"] == "local"
    assert r["kvnet"]["ignored_params"] == []
    got = r["kvnet"]["token_ids"]
    assert got == ref_tokens(tiny_fp32, ids, len(got))
    assert r["usage"]["completion_tokens"] == len(got)
    with node.http() as c:  # kvnet_reuse: false, the node's own full prefill, gives the same tokens
        full = c.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                               "kvnet_reuse": False}).json()
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert full["kvnet"]["token_ids"] == got


def test_a_document_published_for_chat_is_reused_whatever_the_question(node, tiny_fp32):
    tok = tiny_fp32.tokenizer
    with node.http() as c:
        pub = c.post("/v1/kv/publish", json={"text": CHAT_DOC, "for_chat": True}).json()
        assert pub["n_tokens"] == len(document_prefix(tok, CHAT_DOC))
        for question in ("Where is the border?", "Summarise the treaty in one line, please."):
            messages = [{"role": "system", "content": CHAT_DOC}, {"role": "user", "content": question}]
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 16}).json()
            ids = encode_chat(tok, [("system", CHAT_DOC), ("user", question)])
            assert r["object"] == "chat.completion"
            assert r["usage"]["prompt_tokens"] == len(ids)
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == pub["n_tokens"]
            assert r["kvnet"]["manifest_id"] == pub["manifest_id"]
            got = r["kvnet"]["token_ids"]
            assert got == ref_tokens(tiny_fp32, ids, len(got))
            assert r["choices"][0]["message"]["role"] == "assistant"
        # the same document as a user message is a different prefix: nothing is reused
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": [
            {"role": "user", "content": CHAT_DOC}]}).json()
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_gives_the_same_answer_and_ends_with_done(node, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = ({"messages": [{"role": "system", "content": CHAT_DOC}, {"role": "user", "content": "Why?"}]} if chat
            else {"prompt": DOC + " And?"})
    body = {"model": "tiny", "max_tokens": 20, **body}
    with node.http() as c:
        whole = c.post(path, json=body).json()
        with c.stream("POST", path, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            data = events(s)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    if chat:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1])
        want = whole["choices"][0]["message"]["content"]
    else:
        text = "".join(ch["choices"][0]["text"] for ch in chunks[:-1])
        want = whole["choices"][0]["text"]
    assert text == want
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-2]["kvnet"]["token_ids"] == whole["kvnet"]["token_ids"]


def _error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def test_bad_requests_get_openai_shaped_errors_and_the_node_goes_on(node):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with node.http() as c:
        _error(c.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
        _error(c.post("/v1/chat/completions", json={**chat, "model": "gpt-9"}), 404, "model_not_found", "model")
        _error(c.post("/v1/chat/completions", json={k: v for k, v in chat.items() if k != "model"}), 400,
               param="model")
        _error(c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 70000}), 413, "body_too_large")
        _error(c.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 8190, "max_tokens": 16}), 400,
               "context_length_exceeded", "prompt")
        _error(c.post("/v1/chat/completions", json={**chat, "max_tokens": "many"}), 400, param="max_tokens")
        _error(c.post("/v1/chat/completions", json={**chat, "max_tokens": 65}), 400, param="max_tokens")
        _error(c.post("/v1/chat/completions", json={**chat, "n": 2}), 400, param="n")
        _error(c.post("/v1/chat/completions", json={**chat, "temperature": "hot"}), 400, param="temperature")
        _error(c.post("/v1/chat/completions", json={**chat, "messages": []}), 400, param="messages")
        _error(c.post("/v1/chat/completions", json={**chat, "messages": [{"role": "robot", "content": "x"}]}), 400,
               param="messages")
        _error(c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 99999]}), 400, param="prompt")
        _error(c.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"]}), 400, param="prompt")
        _error(c.post("/v1/completions", json=[1, 2]), 400)
        _error(c.get("/v1/nothing"), 404)
        _error(c.get("/v1/chat/completions"), 405)
        _error(c.post("/v1/kv/fetch", json={"manifest_id": "zz"}), 400, param="manifest_id")
        _error(c.post("/v1/kv/publish", json={"text": ""}), 400)
        # sampling parameters it does not apply are accepted and reported, never silently applied
        r = c.post("/v1/chat/completions", json={**chat, "max_tokens": 3, "temperature": 0.8, "top_p": 0.5,
                                                 "frequency_penalty": 0, "wibble": 1})
        assert r.status_code == 200
        assert r.json()["kvnet"]["ignored_params"] == ["temperature", "top_p", "wibble"]
        assert r.headers["x-kvnet-ignored-params"] == "temperature,top_p,wibble"
        assert c.get("/v1/status").status_code == 200
    assert node.proc.poll() is None


def test_the_official_openai_client_works_unchanged(node, tiny_fp32):
    http = httpx.Client(transport=httpx.HTTPTransport(uds=node.socket))
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=http)
    with node.http() as c:
        c.post("/v1/kv/publish", json={"text": CHAT_DOC, "for_chat": True}).raise_for_status()
    messages = [{"role": "system", "content": CHAT_DOC}, {"role": "user", "content": "What is the border?"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    ids = encode_chat(tiny_fp32.tokenizer, [("system", CHAT_DOC), ("user", "What is the border?")])
    assert resp.usage.prompt_tokens_details.cached_tokens == len(document_prefix(tiny_fp32.tokenizer, CHAT_DOC))
    got = resp.model_extra["kvnet"]["token_ids"]
    assert got == ref_tokens(tiny_fp32, ids, len(got))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for ch in stream:
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        if ch.usage is not None:
            usage = ch.usage
    assert "".join(parts) == resp.choices[0].message.content
    assert usage.prompt_tokens_details.cached_tokens == resp.usage.prompt_tokens_details.cached_tokens
    done = client.completions.create(model="tiny", prompt=DOC, max_tokens=4)
    assert done.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=messages)
    assert [m.id for m in client.models.list()] == ["tiny"]
    http.close()


def test_lookup_and_metrics(node, tiny_fp32):
    with node.http() as c:
        pub = c.post("/v1/kv/publish", json={"text": DOC}).json()
        hit = c.post("/v1/kv/lookup", json={"prompt": DOC + " more"}).json()
        assert hit["local"] == {"manifest_id": pub["manifest_id"], "n_tokens": pub["n_tokens"]}
        assert hit["network"] is None  # no peers
        miss = c.post("/v1/kv/lookup", json={"prompt": "unrelated"}).json()
        assert miss["local"] is None
        c.post("/v1/completions", json={"model": "tiny", "prompt": DOC + " more", "max_tokens": 2})
        metrics_addr = c.get("/v1/status").json()["metrics"]
    text = httpx.get(f"http://{metrics_addr}/metrics", timeout=10).text
    assert 'kvnet_requests_total{endpoint="completions",status="200"}' in text
    assert 'kvnet_requests_total{endpoint="kv_lookup",status="200"}' in text
    cached = [ln for ln in text.splitlines() if ln.startswith("kvnet_cached_tokens_total ")]
    assert cached and float(cached[0].split()[1]) >= pub["n_tokens"]
    for name in ("kvnet_fetched_bytes_total", "kvnet_served_bytes", "kvnet_pieces_verified_total",
                 "kvnet_prefill_saved_seconds_total", "kvnet_request_seconds_bucket", "kvnet_peers",
                 "kvnet_store_bytes", "kvnet_generation_queue"):
        assert name in text, name
