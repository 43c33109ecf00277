"""Pins for kvnet/daemon/compat.py, the one patch of Hypercorn internals: each test fails when the
Hypercorn code the patch relies on changes shape, so an upgrade cannot silently turn the connection cap
and the write deadline into no-ops. The last tests run the patched server for real (in-process, on a
Unix socket): a client that never reads its answer is dropped after the write deadline, and its slot
is served again."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version

import hypercorn.trio.run as hc_run
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from kvnet.daemon import compat

WAIT_S = 60.0  # a bound on waiting for the server to act, never a measurement
BIG = 16 * 2**20  # far more than a Unix socket buffers: a client that does not read blocks the writer


def test_upstream_version_is_the_one_the_patch_targets():
    assert version("hypercorn") == compat.UPSTREAM_VERSION, "re-check kvnet/daemon/compat.py"


def test_worker_serve_builds_each_connection_from_the_patched_global():
    assert "TCPServer" in hc_run.worker_serve.__code__.co_names  # looked up at call time, not bound early
    assert hc_run.TCPServer is compat._tcp_server
    params = list(inspect.signature(TCPServer.__init__).parameters)
    assert params == ["self", "app", "config", "context", "state", "stream"]


def test_tcp_server_uses_only_what_the_gated_stream_has():
    used = set(re.findall(r"self\.stream\.(\w+)", inspect.getsource(TCPServer)))
    plain = {"socket", "send_all", "receive_some", "send_eof", "aclose"}
    tls_only = {"do_handshake", "selected_alpn_protocol", "transport_stream"}
    assert used == plain | tls_only
    gated = compat._GatedStream
    assert all(hasattr(gated, a) for a in plain) and not any(hasattr(gated, a) for a in tls_only)
    # the shielded write the deadline exists for
    assert "cancel_scope.shield = True" in inspect.getsource(TCPServer.protocol_send)


async def _app(scope, receive, send):
    """Lifespan, then `/small` a short answer and anything else a BIG one."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    size = 2 if scope["path"] == "/small" else BIG
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(size).encode())]})
    chunk = b"x" * min(size, 65536)
    for _ in range(size // len(chunk)):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _get(path: str, target: str) -> bytes:
    async with await trio.open_unix_socket(path) as s:
        await s.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = bytearray()
        while part := await s.receive_some(65536):
            out += part
        return bytes(out)


@pytest.mark.trio
async def test_a_client_that_does_not_read_is_dropped_and_its_slot_served_again(tmp_path):
    path = str(tmp_path / "s.sock")
    cfg = compat.GatedConfig()
    cfg.bind = [f"unix:{path}"]
    cfg.accesslog = None
    cfg.gate = gate = compat.ConnectionGate(1, 1.0, b"HTTP/1.1 503 x\r\ncontent-length: 0\r\n\r\n")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(_app, cfg, shutdown_trigger=stop.wait, task_status=task_status))
        stuck = await trio.open_unix_socket(path)
        try:
            await stuck.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
            t0 = trio.current_time()
            with trio.fail_after(WAIT_S):
                while gate.active == 0:  # served (the one slot taken) ...
                    await trio.sleep(0.01)
                assert (await _get(path, "/small")).startswith(b"HTTP/1.1 503")  # ... so one more is refused
                while gate.active:  # ... until the write deadline drops the stuck one
                    await trio.sleep(0.01)
            assert trio.current_time() - t0 >= 1.0
            answer = await _get(path, "/small")
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nxx")
            assert gate.refused == 1 and gate.active == 0
        finally:
            await stuck.aclose()  # without the deadline, only this unblocks the server's shielded write
            stop.set()


@pytest.mark.trio
async def test_a_plain_config_is_served_as_hypercorn_serves_it(tmp_path):
    path = str(tmp_path / "p.sock")
    cfg = Config()
    cfg.bind = [f"unix:{path}"]
    cfg.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve(_app, cfg, shutdown_trigger=stop.wait, task_status=task_status))
        answers = [await _get(path, "/small") for _ in range(3)]
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
        stop.set()


@pytest.mark.trio
async def test_the_stop_ends_a_write_to_a_client_that_does_not_read(tmp_path):
    """The node's stop gives such a write `grace_s`, however long agent.send_timeout_s is (it held the
    stop for that long: longer than systemd waits before its SIGKILL)."""
    path = str(tmp_path / "q.sock")
    cfg = compat.GatedConfig()
    cfg.bind = [f"unix:{path}"]
    cfg.accesslog = None
    cfg.graceful_timeout = 0.5
    cfg.gate = gate = compat.ConnectionGate(4, 3600.0, b"")
    stop, done = trio.Event(), trio.Event()

    async def server(task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(_app, cfg, shutdown_trigger=stop.wait, task_status=task_status)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(server)
        stuck = await trio.open_unix_socket(path)
        await stuck.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        with trio.fail_after(WAIT_S):
            while not gate._writes:  # the answer is being written
                await trio.sleep(0.01)
        stop.set()
        gate.stop(0.5)
        with trio.move_on_after(WAIT_S):
            await done.wait()
        ended = done.is_set()
        await stuck.aclose()  # without the stop's deadline, only this ends the server's shielded write
    assert ended and gate.active == 0
