"""The generation queue of a real node: a long generation does not starve a short one, a full queue
answers 503, and a client that disconnects mid-stream frees its slot."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.daemon.nodes import start, write_config

LONG = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 6000, "ignore_eos": True, "stream": True}
SHORT = {"model": "tiny", "prompt": "Hi", "max_tokens": 4}


def _wait_idle(c: httpx.Client, limit_s: float = 60.0) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        q = c.get("/v1/status").json()["queue"]
        if q["active"] == 0:
            return q
        time.sleep(0.2)
    raise AssertionError(f"queue never drained: {q}")


def _first_event(lines) -> dict:
    """The first event from a stream's line iterator (the caller keeps the iterator: dropping it
    would close the connection, which is a disconnect)."""
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: "):])
    raise AssertionError("no event")


def test_fair_bounded_queue_and_disconnects(tmp_path):
    node = start(write_config(tmp_path / "q", log_format="json", queue_size=2, max_tokens=6000, chunk_tokens=4))
    try:
        with node.http() as c, node.http() as c2, node.http() as c3:
            with c.stream("POST", "/v1/completions", json=LONG) as long1:
                lines1 = long1.iter_lines()
                _first_event(lines1)
                # the short request is served between chunks of the long one, which is still running after it
                r = c2.post("/v1/completions", json=SHORT)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
                q = c2.get("/v1/status").json()["queue"]
                assert q["active"] == 1 and q["completed"] == 1, q
                with c3.stream("POST", "/v1/completions", json=LONG) as long2:
                    lines2 = long2.iter_lines()
                    _first_event(lines2)
                    full = c2.post("/v1/completions", json=SHORT)
                    assert full.status_code == 503
                    assert full.json()["error"]["code"] == "queue_full"
                    del lines2  # disconnect mid-stream
                del lines1
            # both streams were closed after one event: their slots are freed long before 6000 tokens
            q = _wait_idle(c2)
            assert q["cancelled"] == 2 and q["rejected"] == 1 and q["completed"] == 1
            assert c2.post("/v1/completions", json=SHORT).status_code == 200
        # a non-streaming client that gives up (here: its read timeout) frees its slot too
        with node.http(timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json={**LONG, "stream": False})
        with node.http() as c:
            q = _wait_idle(c)
            assert q["cancelled"] == 3 and q["completed"] == 2
    finally:
        assert node.stop() == 0
    # the node logged JSON lines only (log.format = "json"), the stop included
    records = [json.loads(line) for line in (tmp_path / "q" / "node.log").read_text().splitlines()]
    assert any(r["msg"].startswith("signal 15: stopping") for r in records)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
