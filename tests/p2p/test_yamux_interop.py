"""A stock py-libp2p peer (no kvnet code, stock yamux settings) fetches pieces from a real `kvnet serve`
and polices yamux flow control the way go/js/rust yamux do: a sender may never put more DATA on a
stream than the receiver granted (256 KiB initial window + the receiver's own WINDOW_UPDATEs).

The stock peer reads slowly (about 1 MiB/s) and does not auto-tune its window, so it grants exactly
256 KiB + what it has read and the kvnet sender really has to wait for credit.
A control run against a server patched the old way (assuming a 4 MiB initial window) shows the
check catches a violation, so the passing run means something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvnet.p2p import wire
from kvnet.p2p.server import PIECES_PROTOCOL
from tests.artifacts import ROOT, fake_artifact, provider_home, serve_process

N_PIECES = 3  # 1 MiB each: about 3 s at the client's reading pace

# Runs in a fresh interpreter whose sys.path lacks the repository, and checks it never saw kvnet.
STOCK_CLIENT = r'''
import json, struct, sys
import blake3, msgpack, multiaddr, trio
import libp2p.stream_muxer.yamux.yamux as Y
from libp2p import new_host
from libp2p.peer.peerinfo import info_from_p2p_addr

addr, protocol, request_hex, hashes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
INITIAL = 256 * 1024
assert Y.DEFAULT_WINDOW_SIZE == INITIAL, "stock settings only"
granted, received, violations = {}, {}, []


class CountingBuffer(bytearray):
    """A stream's receive buffer: upstream extends it once per DATA frame; count against credit."""
    sid = 0

    def extend(self, data):
        received[self.sid] = received.get(self.sid, 0) + len(data)
        credit = granted.setdefault(self.sid, INITIAL)
        if received[self.sid] > credit:
            violations.append((self.sid, received[self.sid], credit))
        super().extend(data)


class CountingBuffers(dict):
    def __setitem__(self, sid, buf):
        counted = CountingBuffer(buf)
        counted.sid = sid
        super().__setitem__(sid, counted)


def instrument(conn):
    """Count every WINDOW_UPDATE we send (credit granted) and every DATA byte we receive."""
    write = conn._write_frame

    async def counting_write(data):
        if len(data) >= Y.HEADER_SIZE:
            _, typ, _, sid, length = struct.unpack(Y.YAMUX_HEADER_FORMAT, data[:Y.HEADER_SIZE])
            if typ == Y.TYPE_WINDOW_UPDATE and sid:
                granted[sid] = granted.setdefault(sid, INITIAL) + length
        await write(data)

    conn._write_frame = counting_write
    conn.stream_buffers = CountingBuffers(conn.stream_buffers)
    # No auto-tuning: upstream doubles its window only with an RTT estimate, and with
    # PY_YAMUX_ASSUME_RTT_MS=0 (set by the test) and no ping measurement it has none. The credit
    # granted is then exactly 256 KiB + what has been read, the strictest a receiver may be.
    conn.rtt = lambda: 0.0


async def read_exact(stream, n):
    out = bytearray()
    while len(out) < n:
        chunk = await stream.read(min(n - len(out), 64 * 1024))
        if not chunk:
            raise SystemExit("stream ended early")
        out += chunk
        await trio.sleep(len(chunk) / (1 << 20))  # about 1 MiB/s
    return bytes(out)


async def frame(stream):
    (size,) = struct.unpack(">I", await read_exact(stream, 4))
    return msgpack.unpackb(await read_exact(stream, size), raw=False)


async def main():
    host = new_host()
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await host.connect(info)
        conn = host.get_network().get_connections(info.peer_id)[0].muxed_conn
        assert type(conn) is Y.Yamux, type(conn)
        instrument(conn)
        stream = await host.new_stream(info.peer_id, [protocol])
        await stream.write(bytes.fromhex(request_hex))
        ok = 0
        with trio.fail_after(60):
            while True:
                head = await frame(stream)
                if head.get("done"):
                    break
                if "n" not in head:
                    raise SystemExit(f"server answered {head}")
                data = await read_exact(stream, head["n"])
                if blake3.blake3(data).hexdigest() != hashes[head["i"]]:
                    raise SystemExit(f"piece {head['i']}: BLAKE3 mismatch")
                ok += 1
        await stream.close()
    assert not any(m == "kvnet" or m.startswith("kvnet.") for m in sys.modules), "imported kvnet"
    print(json.dumps({"pieces": ok, "stream": str(stream.muxed_stream.stream_id), "granted": granted,
                      "received": received, "violations": violations}))
    if violations:
        sid, got, credit = violations[0]
        raise SystemExit(f"yamux flow control violated: stream {sid} received {got} bytes "
                         f"with only {credit} granted")


trio.run(main)
'''

# The pre-fix kvnet: py-libp2p's window constant raised to 4 MiB, so the sender assumes 4 MiB credit.
OLD_SERVER = ("import libp2p.stream_muxer.yamux.yamux as y; y.DEFAULT_WINDOW_SIZE = 4 << 20; "
              "import runpy; runpy.run_module('kvnet.cli', run_name='__main__')")


def _stock_fetch(tmp: Path, addr: str, sm) -> subprocess.CompletedProcess:
    script = tmp / "stock_client.py"
    script.write_text(STOCK_CLIENT)
    request = wire.frame({"v": 1, "manifest": sm.id, "ranges": [[0, N_PIECES]], "receipt": None})
    hashes = [h.hex() for h in sm.manifest.pieces]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PY_YAMUX_")}
    env["PY_YAMUX_ASSUME_RTT_MS"] = "0"  # upstream's knob: no RTT estimate, so no window auto-tuning
    return subprocess.run([sys.executable, str(script), addr, PIECES_PROTOCOL, request.hex(), json.dumps(hashes)],
                          capture_output=True, text=True, timeout=120, cwd=tmp, env=env)


def _serve(home: Path, old: bool) -> tuple[subprocess.Popen, str]:
    if not old:
        return serve_process(home)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", OLD_SERVER, "serve", "--home", str(home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline().split()
    assert first and first[0] == "listening", proc.stderr.read()
    return proc, first[1]


def _run(tmp_path: Path, old: bool) -> tuple[subprocess.CompletedProcess, dict | None]:
    sm, pieces = fake_artifact(61, N_PIECES)
    home = provider_home(tmp_path, "P", sm, pieces)
    proc, addr = _serve(home, old)
    try:
        out = _stock_fetch(tmp_path, addr, sm)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return out, (json.loads(lines[-1]) if lines else None)


def test_kvnet_sender_never_exceeds_the_credit_a_stock_yamux_peer_granted(tmp_path):
    out, report = _run(tmp_path, old=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert report["pieces"] == N_PIECES and not report["violations"]  # on any stream
    sid = report["stream"]  # the pieces stream (others, such as identify, may have carried data too)
    assert report["received"][sid] > N_PIECES << 20  # all piece bytes (+ frames) crossed it
    # the client granted little beyond what it read (256 KiB initial + upstream's release slack), so
    # the sender was really held back; one that assumes 4 MiB of credit fails the control test below
    assert report["received"][sid] <= report["granted"][sid] < report["received"][sid] + (1 << 20)


def test_the_check_catches_a_sender_that_assumes_a_4_mib_window(tmp_path):
    out, report = _run(tmp_path, old=True)
    assert out.returncode != 0 and "yamux flow control violated" in out.stderr, (out.stdout, out.stderr[-3000:])
    assert report is not None and report["violations"]
