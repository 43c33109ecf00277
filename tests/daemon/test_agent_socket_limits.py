"""What one misbehaving local client can hold on the agent socket, each bounded (docs/security.md, "The
agent socket"): a body that stalls or trickles (408 and closed after `agent.body_timeout_s`, holding no
queue slot meanwhile), a head that never ends and an idle keep-alive connection (closed after
`agent.keep_alive_timeout_s`), open connections (`agent.max_connections` per listener: one more is
answered 503 `too_many_connections`, and a slot freed is served again), an oversize body (413), a
client that leaves mid-body (a 499 in the metrics, not a logged 500).

Real kvnet-node processes with shortened limits. No timing thresholds: a wait for the server's close is
bounded only generously (WAIT_S), and the one time asserted is a lower bound, the configured deadline
itself, which the node's timer cannot beat."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.daemon.conftest import TOKEN, _free_port
from tests.daemon.nodes import start, write_config

DEADLINE_S = 1  # the shortened body and keep-alive deadlines of the `fast` node
MAX_CONNECTIONS = 3  # the `capped` node's agent.max_connections
WAIT_S = 60.0  # the most a test waits for the node to act (a bound, never a measurement)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    n = start(write_config(tmp_path_factory.mktemp("fast"), body_timeout_s=DEADLINE_S,
                           keep_alive_timeout_s=DEADLINE_S, queue_size=1, max_body_bytes=4096, max_tokens=8))
    yield n
    n.stop()


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    port = _free_port()
    n = start(write_config(tmp_path_factory.mktemp("capped"), max_connections=MAX_CONNECTIONS, tcp_port=port,
                           token=TOKEN))
    n.tcp_port = port
    yield n
    n.stop()


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT_S)
    s.connect(path)
    return s


def _read_to_eof(s: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection (a reset counts as the close)."""
    out = bytearray()
    while True:
        try:
            part = s.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        out += part
    return bytes(out)


def _read_response(s: socket.socket) -> tuple[int, dict]:
    """One complete HTTP/1.1 response with a Content-Length body, leaving the connection open."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        part = s.recv(65536)
        assert part, f"closed before a whole head: {bytes(buf)!r}"
        buf += part
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(v) for k, _, v in (ln.partition(": ") for ln in lines[1:]) if k.lower() == "content-length")
    while len(body) < length:
        part = s.recv(65536)
        assert part, "closed inside a body"
        body += part
    return int(lines[0].split()[1]), json.loads(body)


def _status(body: bytes) -> int:
    return int(body.split(b" ", 2)[1])


def _json_of(raw: bytes) -> dict:
    return json.loads(raw.partition(b"\r\n\r\n")[2])


def _completion(c: httpx.Client) -> httpx.Response:
    return c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})


HEAD = ("POST /v1/completions HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\n"
        "Content-Length: 200\r\n")


def test_a_stalled_body_is_dropped_and_holds_no_queue_slot(fast):
    t0 = time.monotonic()  # the body's clock starts once the head is in: later than this
    stalled = _connect(fast.socket)
    stalled.sendall((HEAD + "Expect: 100-continue\r\n\r\n").encode())
    # the 100 comes once the node has parsed the head and started the handler: the body's clock runs
    assert stalled.recv(64).startswith(b"HTTP/1.1 100")
    stalled.sendall(b'{"model": "tiny", ')  # then nothing more
    with fast.http() as c:  # queue_size is 1: the stalled request must not hold that slot
        r = _completion(c)
        assert r.status_code == 200, r.text
    raw = _read_to_eof(stalled)
    assert time.monotonic() - t0 >= DEADLINE_S
    assert b"HTTP/1.1 408" in raw and _json_of(raw.split(b"HTTP/1.1 408", 1)[1])["error"]["code"] == "body_timeout"
    stalled.close()
    with fast.http() as c:
        assert _completion(c).status_code == 200


def test_a_trickled_body_is_dropped_at_the_same_deadline(fast):
    s = _connect(fast.socket)
    s.sendall((HEAD + "\r\n").encode())
    s.settimeout(0.2)  # one byte per 0.2 s: 200 bytes would take 40 s
    sent, raw = 0, b""
    while sent < 200:
        try:
            s.send(b" ")
            sent += 1
            raw = s.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if raw:
            break
    assert sent < 200, "the whole trickled body was accepted"
    s.settimeout(WAIT_S)
    raw += _read_to_eof(s)
    s.close()
    assert raw.startswith(b"HTTP/1.1 408"), raw[:200]


def test_a_head_that_never_ends_and_an_idle_connection_are_closed(fast):
    t0 = time.monotonic()  # before the connect: the node may accept, and start its timer, before it returns
    partial = _connect(fast.socket)
    partial.sendall(b"GET /v1/models HTTP/1.1\r\nHost: node\r\n")  # no blank line, ever
    assert _read_to_eof(partial) == b""
    assert time.monotonic() - t0 >= DEADLINE_S
    partial.close()

    idle = _connect(fast.socket)
    t0 = time.monotonic()  # the idle timer restarts once the answer is out, so later than this
    idle.sendall(b"GET /v1/models HTTP/1.1\r\nHost: node\r\n\r\n")
    status, body = _read_response(idle)
    assert status == 200 and body["data"][0]["id"] == "tiny"
    assert _read_to_eof(idle) == b""  # kept alive, then closed once idle for the keep-alive timeout
    assert time.monotonic() - t0 >= DEADLINE_S
    idle.close()


def test_an_oversize_body_is_413(fast):
    with fast.http() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():  # no Content-Length: refused as the bytes arrive
            for _ in range(8):
                yield b" " * 1024

        r = c.post("/v1/kv/lookup", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert _completion(c).status_code == 200


def test_one_connection_over_the_cap_is_refused_until_one_closes(capped):
    held = [_connect(capped.socket) for _ in range(MAX_CONNECTIONS)]
    for s in held:  # each answered, so each holds a slot now, whatever order the node took them in
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: node\r\n\r\n")
        assert _read_response(s)[0] == 200
    with capped.http() as c:
        r = c.get("/v1/models")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_connections" and err["type"] == "server_error"
    # the TCP listener has slots of its own: a full Unix socket does not stop it
    tcp = httpx.get(f"http://127.0.0.1:{capped.tcp_port}/v1/models", headers={"authorization": f"Bearer {TOKEN}"},
                    timeout=WAIT_S)
    assert tcp.status_code == 200, tcp.text
    # one held connection ends (the node closes it after this answer, and frees its slot before the close)
    held[0].sendall(b"GET /v1/models HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
    raw = _read_to_eof(held[0])
    assert _status(raw) == 200
    with capped.http() as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/models").status_code == 200  # the same connection, kept alive
        with capped.http() as other:
            assert other.get("/v1/models").status_code == 503  # full again: two held + this client's
    for s in held:
        s.close()


def _count(node, endpoint: str, status: str) -> float:
    text = httpx.get(f"http://{node.ready['metrics']}/metrics", timeout=WAIT_S).text
    line = f'kvnet_requests_total{{endpoint="{endpoint}",status="{status}"}} '
    return sum(float(ln[len(line):]) for ln in text.splitlines() if ln.startswith(line))


def test_a_client_that_leaves_mid_body_is_a_499_not_a_logged_500(fast):
    before = _count(fast, "completions", "499")
    s = _connect(fast.socket)
    s.sendall((HEAD + "Expect: 100-continue\r\n\r\n").encode())
    assert s.recv(64).startswith(b"HTTP/1.1 100")  # the handler is reading the body
    s.sendall(b'{"model": ')
    s.close()
    deadline = time.monotonic() + WAIT_S  # a bound on waiting for the node's count, not a measurement
    while _count(fast, "completions", "499") == before:
        assert time.monotonic() < deadline, "the request was never counted as 499"
        time.sleep(0.05)
    assert _count(fast, "completions", "500") == 0
    assert "Traceback" not in (fast.dir / "node.log").read_text()
