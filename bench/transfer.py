"""Transfer throughput over loopback: raw TCP vs kvnet fetch over libp2p streams and over the bulk
path (TLS and plain TCP), each from 1 and from 3 provider processes.

    .venv/bin/python bench/transfer.py --mb 256 --runs 3 [--reuse-tokens 2048] [--only bulk]

Providers are real `kvnet serve` processes holding a signed 256 MiB artifact (Qwen3-0.6B-shaped
bf16 KV of seeded bytes); the fetcher runs in this process and every fetch figure includes verifying
each piece against the signed manifest and the durable store write. The "receive + verify" rows time
the bulk receiver alone (grants redeemed, every piece verified, then dropped: no store), to show what
the store costs; that is a benchmark-only path. min/median/max of --runs, and each median's ratio
to raw TCP's; "received" is the bytes read from providers over the artifact's size (endgame duplicates).
"CPU s" is the CPU time (user + system) used during the fetch itself by this process (the fetcher)
and by all provider processes together, median over runs: on a shared 2-core machine it says
whether a row is limited by the CPU it can get.

--breakdown: where the CPU of a durable bulk fetch goes, per stage, in CPU seconds per GiB
(thread_time in the thread that does each stage; the fetcher's and the provider's trio loop are their
main threads' CPU), next to the same stages in bench/bulk_floor.py's minimal script;
--breakdown-providers 1,3 adds the same from 3 providers (with the fetcher's run-queue wait: what
the providers' share of 2 cores costs it).

Remote reuse (--reuse-tokens, default 2048, on --reuse-model `qwen3-0.6b-shape`, bf16): a document is
published into a provider's store and served by a real `kvnet serve` process; "full prefill" runs
document + question to the first answer token; "local reuse" loads the verified KV from the
publisher's store and runs the question to the first token (kvnet.reuse.load_prefix, as
bench/publish_load.py times it); "remote reuse" is a fresh fetcher node in this process that fetches
the artifact over the bulk path (after finding it), building the KV from each piece as it verifies
(kvnet.artifact.KVBuilder, as kvnet-node does), and runs the question: fetch + load (what the fetch
did not bring, nothing here) + first token. Ratios are to full prefill and to local reuse (the target is
within 1.3x of local reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvnet.p2p import bulk_wire, wire  # noqa: E402
from kvnet.p2p.bulk_client import BulkConnection, ClientGrant, Handler  # noqa: E402
from kvnet.p2p.node import Node  # noqa: E402
from kvnet.store import Store  # noqa: E402
from tests.artifacts import fake_artifact, provider_home, serve_process  # noqa: E402

console = Console(width=200)
SENDER = r"""
import socket, sys
data = bytes(1 << 20)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for _ in range(int(sys.argv[2])):
    s.sendall(data)
s.close()
"""


def raw_tcp(mb: int) -> float:
    """MB/s of a plain TCP stream between two processes on loopback (1 MiB writes)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    proc = subprocess.Popen([sys.executable, "-c", SENDER, str(srv.getsockname()[1]), str(mb)])
    return receive_all(srv, proc)


def receive_all(srv: socket.socket, proc: subprocess.Popen) -> float:
    """MB/s of the one stream `proc` sends to the listening `srv` (1 MiB reads); closes both sockets."""
    conn, _ = srv.accept()
    view = memoryview(bytearray(1 << 20))
    total, t0 = 0, time.perf_counter()
    while n := conn.recv_into(view):
        total += n
    dt = time.perf_counter() - t0
    proc.wait()
    conn.close()
    srv.close()
    return total / 1e6 / dt


async def _found(client: Node, mid: bytes, n_providers: int):
    found = None
    for _ in range(50):  # announcements may still be propagating
        found = await client.find_manifest(mid)
        if found and len(found.providers) >= n_providers:
            break
        await trio.sleep(0.2)
    if found is None or len(found.providers) < n_providers:
        raise SystemExit(f"only {len(found.providers) if found else 0} of {n_providers} providers found")
    found.providers = found.providers[:n_providers]
    return found


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes (from /proc)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main_thread_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by the main thread of each process (a node's trio loop)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_queue_wait(pids: list[int]) -> float:
    """Seconds the threads of these processes spent runnable but waiting for a CPU (schedstat's second
    field, summed over the threads alive now: a lower bound across an interval in which threads end)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


async def fetch_once(tmp: Path, bootstrap: str, mid: bytes, n_providers: int, window: int, batch: int,
                     bulk: str | None, provider_pids: list[int] | None = None) -> dict:
    client = Node(Ed25519PrivateKey.generate(), Store(tmp / "store"), bootstrap=[bootstrap], timeout=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(client.run, announce=False))  # like `kvnet fetch`
        found = await _found(client, mid, n_providers)
        pids = provider_pids or []
        cpu0, prov0, loop0 = time.process_time(), proc_cpu(pids), time.thread_time()
        pmain0 = main_thread_cpu(pids)
        wait0, pwait0 = run_queue_wait([os.getpid()]), run_queue_wait(pids)
        result = await client.fetch(found, found.signed.manifest.n_tokens, window=window, batch=batch, bulk=bulk)
        cpu = {"fetcher": time.process_time() - cpu0, "providers": proc_cpu(pids) - prov0,
               "fetcher_loop": time.thread_time() - loop0, "providers_loop": main_thread_cpu(pids) - pmain0,
               "fetcher_wait": run_queue_wait([os.getpid()]) - wait0, "providers_wait": run_queue_wait(pids) - pwait0}
        nursery.cancel_scope.cancel()
    client.store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"mb_s": result.mb_per_s, "seconds": result.seconds, "received": result.received_bytes / result.bytes,
            "paths": sorted(set(result.paths.values())), "cpu": cpu, "store": result.store_timers,
            "per_provider": {p[:12]: (s["pieces"], s["dropped"]) if s["dropped"] else s["pieces"]
                             for p, s in result.providers.items()}}


class _Discard(Handler):
    """Benchmark only: verified pieces are counted and their buffers reused, nothing is stored."""

    def __init__(self, buffers: queue.SimpleQueue) -> None:
        self.buffers, self.bytes = buffers, 0

    def piece(self, grant, index, data) -> None:
        self.bytes += len(data)
        self.buffers.put(data.obj)

    def missing(self, grant, index) -> None:
        raise RuntimeError(f"provider lacks piece {index}")

    def done(self, grant) -> None:
        pass


async def receive_only(bootstrap: str, mid: bytes, mode: str) -> dict:
    """Bulk receive + verify of the whole artifact from one provider, without the store."""
    client = Node(Ed25519PrivateKey.generate(), Store(Path(tempfile.mkdtemp(prefix="kvnet-rx-")) / "store"),
                  bootstrap=[bootstrap], timeout=30, bulk_listen=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(client.run, announce=False))
        found = await _found(client, mid, 1)
        m, peer = found.signed.manifest, found.providers[0].peer
        grants: queue.Queue = queue.Queue()
        answer = None
        t0 = time.perf_counter()
        for start in range(0, len(m.pieces), 64):  # all grants up front: 64 pieces each
            end = min(start + 64, len(m.pieces))
            stream = await client._open(peer, bulk_wire.BULK_PROTOCOL)
            await wire.write_frame(stream, {"v": 1, "manifest": found.signed.id, "ranges": [[start, end]],
                                            "mode": mode, "receipt": None})
            answer = await wire.read_frame(stream, wire.MAX_REQUEST)
            await stream.close()
            grants.put(ClientGrant(answer["token"], list(range(start, end))))
        grants.put(None)
        buffers: queue.SimpleQueue = queue.SimpleQueue()
        sink = _Discard(buffers)

        def run() -> None:
            conn = BulkConnection("127.0.0.1", answer["port"], mode, answer["fingerprint"], 30)
            conn.run(m, grants, sink, buffers)

        await trio.to_thread.run_sync(run)
        seconds = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    client.store.close()
    return {"mb_s": sink.bytes / 1e6 / seconds, "seconds": seconds}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


async def _fetch_for_reuse(tmp: Path, bootstrap: str, mid: bytes, mode: str, engine) -> tuple[Store, dict, Any]:
    """A fresh fetcher node: find the artifact, then fetch it over bulk `mode` (timed), building the KV
    from the pieces as they verify (kvnet.artifact.KVBuilder, as the daemon does)."""
    from kvnet.artifact import KVBuilder

    client = Node(Ed25519PrivateKey.generate(), Store(tmp / "store"), bootstrap=[bootstrap], timeout=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(client.run, announce=False))
        t0 = time.perf_counter()
        found = await _found(client, mid, 1)
        t1 = time.perf_counter()
        builder = KVBuilder(found.signed.manifest, engine)
        result = await client.fetch(found, bulk=mode, on_verified=builder.add)
        t2 = time.perf_counter()
        nursery.cancel_scope.cancel()
    return client.store, {"find_s": t1 - t0, "fetch_s": t2 - t1, "fetch_mb_s": result.mb_per_s}, builder


def remote_reuse_once(tmp: Path, bootstrap: str, mid: bytes, mode: str, engine, suffix: list[int]) -> dict:
    """Fetch over the bulk path (the KV built as pieces verify), then load (only what the fetch did
    not bring: nothing here) + first token. The node is stopped before the forward pass (as the
    daemon runs it off its trio loop); node start and stop are not counted, the lookup is reported
    apart."""
    from kvnet.reuse import load_prefix

    store, row, builder = trio.run(_fetch_for_reuse, tmp, bootstrap, mid, mode, engine)
    try:
        t0 = time.perf_counter()
        kv = load_prefix(engine, store, mid, builder=builder)
        t1 = time.perf_counter()
        engine.generate_from(kv, suffix, 1)
        t2 = time.perf_counter()
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {**row, "load_s": t1 - t0, "first_token_s": t2 - t1, "total_s": row["fetch_s"] + t2 - t0}


def reuse_rows(tmp: Path, model: str, n_tokens: int, runs: int) -> dict:
    """Full prefill, local reuse and remote reuse (bulk tcp and tls) of one document's first answer token."""
    from kvnet import identity
    from kvnet.engine import Engine
    from kvnet.exactness import SUFFIX_TEXT, seeded_document
    from kvnet.publish import publish_tokens
    from kvnet.reuse import load_prefix

    engine = Engine(model, "bf16")
    doc = seeded_document(engine.tokenizer, n_tokens, seed=n_tokens)
    suffix = engine.tokenizer.encode(SUFFIX_TEXT)
    home = tmp / "R"
    identity.generate(home / "identity.key")
    with Store(home / "store") as store:
        pub = publish_tokens(engine, store, Ed25519PrivateKey.generate(), doc)
    mid = pub.manifest_id
    size = pub.signed.manifest.total_bytes
    console.print(f"reuse: {model}, {n_tokens} tokens, artifact {size / 1e6:.0f} MB")
    out: dict[str, dict] = {"full prefill": {"runs": []}, "local reuse": {"runs": [], "load": []}}
    for mode in ("tcp", "tls"):
        out[f"remote reuse, bulk {mode}"] = {"runs": [], "detail": []}
    proc, addr = serve_process(home)
    try:  # the paths take turns within each run, so that a noisy stretch of the machine hits all of them
        for r in range(runs):
            out["full prefill"]["runs"].append(_timed(lambda: engine.generate_from(None, doc + suffix, 1))[1])
            with Store(home / "store") as store:  # a fresh handle, as a new process would open it
                kv, t_load = _timed(lambda s=store: load_prefix(engine, s, mid))
            _, t_first = _timed(lambda kv=kv: engine.generate_from(kv, suffix, 1))
            del kv
            out["local reuse"]["runs"].append(t_load + t_first)
            out["local reuse"]["load"].append(t_load)
            console.print(f"  local reuse: load {t_load:.3f} + first token {t_first:.3f} = {t_load + t_first:.3f} s")
            for mode in ("tcp", "tls"):
                row = remote_reuse_once(tmp / f"RR-{mode}-{r}", addr, mid, mode, engine, suffix)
                console.print(f"  remote reuse over bulk {mode}: fetch {row['fetch_s']:.3f} s "
                              f"({row['fetch_mb_s']:.0f} MB/s) + load {row['load_s']:.3f} + first token "
                              f"{row['first_token_s']:.3f} = "
                              f"{row['total_s']:.3f} s (find {row['find_s']:.3f} s, not counted)")
                out[f"remote reuse, bulk {mode}"]["runs"].append(row["total_s"])
                out[f"remote reuse, bulk {mode}"]["detail"].append(row)
    finally:
        proc.terminate()
        proc.wait(10)
    out["artifact_bytes"] = size  # type: ignore[assignment]
    return out


def reuse_table(res: dict, model: str, n_tokens: int, runs: int) -> Table:
    full = statistics.median(res["full prefill"]["runs"])
    local = statistics.median(res["local reuse"]["runs"])
    t = Table("path", "min s", "median s", "max s", "/ full prefill", "/ local reuse",
              title=f"first answer token, {model} bf16, {n_tokens}-token document ({res['artifact_bytes'] / 1e6:.0f} "
              f"MB of KV), {runs} runs")
    for name, row in res.items():
        if name == "artifact_bytes":
            continue
        v = row["runs"]
        med = statistics.median(v)
        row.update(min=min(v), median=med, max=max(v), ratio_to_full_prefill=med / full,
                   ratio_to_local_reuse=med / local)
        t.add_row(name, f"{min(v):.3f}", f"{med:.3f}", f"{max(v):.3f}", f"{med / full:.2f}", f"{med / local:.2f}")
    return t


class Breakdown:
    """Benchmark only: timers wrapped around the fetcher's receive path (this process): wall and
    CPU (thread_time) seconds per fetch, summed over threads."""

    def __init__(self) -> None:
        import threading

        from kvnet.p2p import bulk_client, fetcher

        self.t: dict[str, float] = {}
        self._lock = threading.Lock()
        conn = bulk_client.BulkConnection
        conn._recv_exact = self._both("receiver: recv_into (headers + pieces)", conn._recv_exact)
        bulk_client.verify_piece = self._both("receiver: BLAKE3", bulk_client.verify_piece)
        fetcher.Fetch.offer = self._both("receiver: hand-off to the writer (queue, backpressure)", fetcher.Fetch.offer)
        conn.run = self._cpu("receiver thread: CPU", conn.run)
        fetch = fetcher.Fetch._open_writer

        async def opened(f):
            w = await fetch(f)
            self.t0 = time.perf_counter()
            return w
        fetcher.Fetch._open_writer = opened
        offer = fetcher.Fetch.offer

        def first(f, *a):
            self.t.setdefault("first piece handed over, after the writer opened (wall s)",
                              time.perf_counter() - self.t0)
            return offer(f, *a)
        fetcher.Fetch.offer = first

    def _add(self, name: str, dt: float) -> None:
        with self._lock:
            self.t[name] = self.t.get(name, 0.0) + dt

    def _both(self, name: str, fn):
        def timed(*a, **k):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self._add(name + " (wall s)", time.perf_counter() - t0)
                self._add(name, time.thread_time() - c0)
        return timed

    def _cpu(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self._add(name, time.thread_time() - t0)
        return timed


# (breakdown row, floor row): the floor's stage (bench/bulk_floor.py) that a product row compares with
FLOOR_ROWS = {
    "receiver: recv_into (headers + pieces)": "receiver: recv_into (headers + pieces)",
    "receiver: BLAKE3": "receiver: BLAKE3",
    "receiver: hand-off to the writer (queue, backpressure)": "receiver: queue hand-off",
    "writer threads: CPU": "writer threads: O_DIRECT pwrite",
    "committer thread: CPU (fdatasync + index commit)": None,
    "fetcher process: CPU": "receiver process",
    "provider process: CPU": "sender process",
}


def breakdown(args: argparse.Namespace) -> dict:
    """Where the CPU (and time) of one durable fetch goes, per GiB, from 1 provider (against the floor
    of the same stages in one minimal script, bench/bulk_floor.py) and, with --breakdown-providers
    1,3, from 3 (the fetcher's extra work, and its threads' wait for a CPU that the providers share);
    medians of --runs, the fetches interleaved."""
    from bench import bulk_floor

    bd = Breakdown()
    counts = sorted({int(n) for n in args.breakdown_providers.split(",")})
    out: dict[str, dict[str, float]] = {}
    floor: dict[str, dict[str, float]] = {}
    gib = args.mb / 1024
    with tempfile.TemporaryDirectory(prefix="kvnet-breakdown-") as tmpdir:
        tmp = Path(tmpdir)
        sm, pieces = fake_artifact(7, args.mb, kv_shape=(28, 8, 128))
        src = tmp / "floor-source.kv"
        src.write_bytes(b"".join(pieces)[: (sm.manifest.total_bytes // bulk_floor.PIECE) * bulk_floor.PIECE])
        procs: list[subprocess.Popen] = []
        addrs: list[str] = []
        for name in [f"P{k + 1}" for k in range(max(counts))]:
            proc, addr = serve_process(provider_home(tmp, name, sm, pieces), addrs[0] if addrs else None)
            procs.append(proc)
            addrs.append(addr)
        del pieces
        pids = [p.pid for p in procs]
        runs: dict[str, list[dict[str, float]]] = {}
        try:
            for r in range(args.runs):
                for mode in ("tcp", "tls"):
                    for n in counts:
                        bd.t = {}
                        res = trio.run(fetch_once, tmp / f"B-{mode}-{n}-{r}", addrs[0], sm.id, n, args.window,
                                       args.batch, mode, pids)
                        runs.setdefault(f"{mode} {n}", []).append(_breakdown_row(bd, res, gib))
            for mode in ("tcp", "tls"):
                fl = [bulk_floor.run_once(src, tmp, mode, bulk_floor.WRITERS, True) for _ in range(args.runs)]
                floor[mode] = {k: statistics.median(f["cpu_s_per_gib"].get(k, 0.0) for f in fl)
                               for k in fl[0]["cpu_s_per_gib"]}
                floor[mode]["MB/s (wall)"] = statistics.median(f["mb_s"] for f in fl)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    for col, rows in runs.items():
        keys = list(dict.fromkeys(k for r in rows for k in r))
        out[col] = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    cols = [(mode, n) for mode in ("tcp", "tls") for n in counts]
    heads = [h for mode, n in cols for h in ([f"bulk {mode} {n}p"] + ([f"floor {mode}"] if n == 1 else []))]
    table = Table("stage (CPU s per GiB unless marked, median)", *heads,
                  title=f"where the CPU of a durable {args.mb} MiB fetch goes, from {' and '.join(map(str, counts))} "
                  f"provider(s), product vs floor (bench/bulk_floor.py), {args.runs} runs")
    for k in out[f"tcp {counts[0]}"]:
        fk = "MB/s (wall)" if k == "MB/s (wall)" else FLOOR_ROWS.get(k)
        fmt = "{:.0f}" if k in ("MB/s (wall)", "groups committed") else "{:.3f}"
        cells = []
        for mode, n in cols:
            cells.append(fmt.format(out[f"{mode} {n}"].get(k, 0.0)))
            if n == 1:
                cells.append(fmt.format(floor[mode][fk]) if fk and fk in floor[mode] else "")
        table.add_row(k, *cells)
    console.print(table)
    return {"product": out, "floor": floor, "unit": "CPU s per GiB unless the key says otherwise"}


def _breakdown_row(bd: Breakdown, res: dict, gib: float) -> dict[str, float]:
    """One fetch's stages, per GiB (the timers `bd` collected, the store's, the processes' CPU)."""
    st, c = res["store"], res["cpu"]
    row = {k: v / gib for k, v in bd.t.items() if "wall" not in k}
    row.update({"writer threads: CPU": st["writer_cpu"] / gib,
                "committer thread: CPU (fdatasync + index commit)": st.get("committer_cpu", 0.0) / gib,
                "fetcher: trio loop (main thread)": c["fetcher_loop"] / gib,
                "fetcher process: CPU": c["fetcher"] / gib,
                "provider: trio loop (main thread)": c["providers_loop"] / gib,
                "provider: other threads (bulk connection, store)": (c["providers"] - c["providers_loop"]) / gib,
                "provider process: CPU": c["providers"] / gib,
                "fetcher: runnable, waiting for a CPU (at least)": c["fetcher_wait"] / gib,
                "provider: runnable, waiting for a CPU (at least)": c["providers_wait"] / gib,
                "wall: whole fetch (s per GiB)": res["seconds"] / gib,
                **{k + " (s per GiB)": v / gib for k, v in bd.t.items() if "wall" in k},
                "wall: O_DIRECT pwrite, summed over the writer threads (s per GiB)": st["pwrite"] / gib,
                "wall: fdatasync (s per GiB)": st["fdatasync"] / gib,
                "wall: index commit (s per GiB)": st["commit"] / gib,
                "groups committed": st["groups"], "MB/s (wall)": res["mb_s"]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--window", type=int, default=4, help="concurrent requests per provider")
    ap.add_argument("--batch", type=int, default=8, help="pieces per request")
    ap.add_argument("--only", choices=["all", "bulk", "none"], default="all",
                    help="transfer rows: all, bulk only (no libp2p streams), or none (reuse rows only)")
    ap.add_argument("--reuse-tokens", type=int, default=2048, help="document length of the reuse rows (0: skip)")
    ap.add_argument("--reuse-model", default="qwen3-0.6b-shape")
    ap.add_argument("--reuse-runs", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true", help="also time the steps of bulk fetches")
    ap.add_argument("--breakdown-providers", default="1",
                    help="provider counts of the breakdown, comma-separated (e.g. 1,3)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "transfer.json")
    args = ap.parse_args()
    report: dict = {}
    if args.only != "none":
        report["transfer"] = transfer(args)
    if args.breakdown:
        report["breakdown"] = breakdown(args)
    if args.reuse_tokens:
        with tempfile.TemporaryDirectory(prefix="kvnet-reuse-") as tmpdir:
            res = reuse_rows(Path(tmpdir), args.reuse_model, args.reuse_tokens, args.reuse_runs)
        console.print(reuse_table(res, args.reuse_model, args.reuse_tokens, args.reuse_runs))
        report["reuse"] = {"model": args.reuse_model, "tokens": args.reuse_tokens, "rows": res}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


def transfer(args: argparse.Namespace) -> dict:
    """The throughput rows; returns them for the JSON report."""

    with tempfile.TemporaryDirectory(prefix="kvnet-transfer-") as tmpdir:
        tmp = Path(tmpdir)
        sm, pieces = fake_artifact(7, args.mb, kv_shape=(28, 8, 128))
        console.print(f"artifact: {sm.manifest.total_bytes / 2**20:.0f} MiB in {len(pieces)} pieces")
        procs, addrs = [], []
        for name in ("P1", "P2", "P3"):
            proc, addr = serve_process(provider_home(tmp, name, sm, pieces), addrs[0] if addrs else None)
            procs.append(proc)
            addrs.append(addr)
        del pieces
        rows: dict[str, list[float]] = {}
        received: dict[str, list[float]] = {}
        cpus: dict[str, list[dict]] = {}
        pids = [p.pid for p in procs]
        try:
            rows["raw TCP loopback (1 MiB writes)"] = [raw_tcp(args.mb) for _ in range(args.runs)]
            for mode in ("tls", "tcp"):
                rows[f"bulk {mode}, 1 provider: receive + verify (no store)"] = [
                    trio.run(receive_only, addrs[0], sm.id, mode)["mb_s"] for _ in range(args.runs)]
            paths = (("libp2p streams", None),) if args.only == "all" else ()
            cases = [(label, bulk, n) for label, bulk in (*paths, ("bulk tls", "tls"), ("bulk tcp", "tcp"))
                     for n in (1, 3)]
            for r in range(args.runs):  # runs interleaved across rows: a load change hits every row alike
                for label, bulk, n in cases:
                    res = trio.run(fetch_once, tmp / f"C-{bulk}-{n}-{r}", addrs[0], sm.id, n, args.window,
                                   args.batch, bulk, pids)
                    console.print(f"  {label}, {n} provider(s), run {r + 1}: {res['mb_s']:.0f} MB/s, "
                                  f"received {res['received']:.3f}x, CPU s fetcher {res['cpu']['fetcher']:.2f} "
                                  f"providers {res['cpu']['providers']:.2f}, {res['paths']} {res['per_provider']}")
                    name = f"{label}, {n} provider{'s' if n > 1 else ''} (verify + store)"
                    rows.setdefault(name, []).append(res["mb_s"])
                    received.setdefault(name, []).append(res["received"])
                    cpus.setdefault(name, []).append(res["cpu"])
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    raw = statistics.median(rows["raw TCP loopback (1 MiB writes)"])
    table = Table("path", "min MB/s", "median MB/s", "max MB/s", "median / raw TCP", "received (max)",
                  "CPU s: fetcher", "CPU s: providers",
                  title=f"{args.mb} MiB over loopback, {args.runs} runs; streams: window {args.window}, "
                  f"batch {args.batch}")
    for name, runs in rows.items():
        rx = f"{max(received[name]):.3f}x" if name in received else ""
        cf = f"{statistics.median(c['fetcher'] for c in cpus[name]):.2f}" if name in cpus else ""
        cp = f"{statistics.median(c['providers'] for c in cpus[name]):.2f}" if name in cpus else ""
        table.add_row(name, f"{min(runs):.0f}", f"{statistics.median(runs):.0f}", f"{max(runs):.0f}",
                      f"{statistics.median(runs) / raw:.2f}", rx, cf, cp)
    console.print(table)
    return {k: {"min": min(v), "median": statistics.median(v), "max": max(v),
                "ratio_to_raw_tcp": statistics.median(v) / raw, "runs": v,
                "received_over_artifact": received.get(k), "cpu_s": cpus.get(k)} for k, v in rows.items()}


if __name__ == "__main__":
    main()
