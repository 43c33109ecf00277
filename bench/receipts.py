"""Receipt throughput: signed, parsed-and-verified, and made durable (accepted into a ledger) per second.

    .venv/bin/python bench/receipts.py --n 2000 --runs 3 --lines 1

- sign: `receipts.sign_receipt` (Ed25519 via `cryptography`, canonical msgpack), in memory.
- verify: `receipts.parse_receipt` (size, canonical re-encoding, fields, channel id, signature).
- pay durable: `Ledger.pay`, the payer's side: sign + one SQLite IMMEDIATE transaction committed with
  synchronous=FULL (WAL) before it returns.
- accept durable: `Ledger.accept`, the payee's side: verify + the sequence rules + one committed
  transaction per receipt, as a payee does before it serves the credit a receipt buys.

Each run uses fresh ledgers in --dir (default: the system temp dir; its disk sets the durable rows).
Prints min/median/max receipts per second and writes bench/out/receipts.json. With 1 MiB pieces and a
receipt per piece, the durable rates bound the fetch speed payments allow: N receipts/s pays N MiB/s.

With --fetch-mb M (e.g. 256), it also measures the payment overhead on a fetch: one `kvnet serve`
process holds an M MiB artifact, and this process fetches it with a fresh node and ledger each time,
alternately from the provider serving for free and serving at --fee per MiB (a separate `kvnet serve`
process each, the same store), --fetch-runs times each, in the same run. The time is `Node.fetch`
wall clock, including the final payment (`pay` on /kvnet/receipts/1.0.0); beside it, the CPU seconds
the fetching process and the provider process spent on it (a figure less sensitive to other load on
the machine). Receipts go per group of pieces (with a request, or with `pay` every 32 MiB), not per
piece.

    .venv/bin/python -m bench.receipts --n 500 --runs 1 --fetch-mb 256 --fetch-runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvnet import identity, receipts  # noqa: E402
from kvnet.ledger import Ledger  # noqa: E402
from kvnet.receipts import Channel, Line  # noqa: E402

console = Console()


def _lines(k: int) -> list[Line]:
    return [Line(bytes([i]) * 32, "hosting", 1 << 20, 40) for i in range(k)]


def run_once(n: int, k: int, where: Path) -> dict[str, float]:
    """Receipts per second of each operation over n receipts of k lines."""
    payer, payee = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ch = Channel.new(identity.public_bytes(payer), identity.public_bytes(payee), "USD")
    lines = _lines(k)
    rates: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        fn()
        rates[name] = n / (time.perf_counter() - t0)

    signed: list[receipts.SignedReceipt] = []
    timed("sign", lambda: signed.extend(receipts.sign_receipt(payer, ch, i + 1, (i + 1) * 40 * k, lines)
                                        for i in range(n)))
    timed("verify", lambda: [receipts.parse_receipt(sr.raw) for sr in signed])
    with tempfile.TemporaryDirectory(dir=where) as tmp, Ledger(Path(tmp) / "payer.sqlite", payer) as pl, \
            Ledger(Path(tmp) / "payee.sqlite", payee) as ql:
        chan = pl.open_channel(ch.payee, "USD")
        paid: list[bytes] = []
        timed("pay durable", lambda: paid.extend(pl.pay(chan, lines).raw for _ in range(n)))
        timed("accept durable", lambda: [ql.accept(raw, ch.payee) for raw in paid])
        assert ql.latest(chan.id).seq == n
    return rates


FETCH_FEE = 40


async def _fetch_once(home: Path, addr: str, mid: bytes, bulk: str | None) -> dict[str, float]:
    from functools import partial

    import trio

    from kvnet.p2p import commands

    node = commands.open_node(home, None, [addr], timeout=10.0)
    async with trio.open_nursery() as n:
        await n.start(partial(node.run, announce=False))
        found = await node.find_manifest(mid)
        t0, c0 = time.perf_counter(), time.process_time()
        r = await node.fetch(found, bulk=bulk)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        n.cancel_scope.cancel()
    receipts_n = node.ledger.db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    paid = node.ledger.db.execute("SELECT COALESCE(SUM(cumulative), 0) FROM channels WHERE role='out'").fetchone()[0]
    node.ledger.close()
    node.store.close()
    return {"mb_per_s": r.bytes / 1e6 / seconds, "seconds": seconds, "bytes": r.bytes, "receipts": receipts_n,
            "paid": paid, "fetcher_cpu_s": cpu}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far, from /proc."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve(home: Path, fee: int, window: int | None = None):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    extra = ["--credit-window", str(window)] if window is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "kvnet.cli", "serve", "--home", str(home), "--fee-per-mib",
                             str(fee), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline().split()
    if not first or first[0] != "listening":
        raise RuntimeError(f"kvnet serve did not start: {proc.stderr.read()}")
    return proc, first[1]


def fetch_overhead(mb: int, runs: int, where: Path, bulk: str | None, window: int | None = None) -> dict:
    """MB/s of an `mb` MiB fetch from one provider, free and paid, alternating, `runs` times each."""
    import trio

    from kvnet import identity as ident
    from tests.artifacts import fake_artifact, provider_home

    sm, pieces = fake_artifact(7, mb, kv_shape=(28, 8, 128))
    out: dict[str, list[dict[str, float]]] = {"free": [], "paid": []}
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        home = provider_home(Path(tmp), "P", sm, pieces)
        del pieces
        for i in range(runs):
            order = ("free", "paid") if i % 2 == 0 else ("paid", "free")
            for kind in order:
                proc, addr = _serve(home, FETCH_FEE if kind == "paid" else 0, window if kind == "paid" else None)
                try:
                    fhome = Path(tmp) / f"F-{kind}-{i}"
                    ident.generate(fhome / "identity.key")
                    p0 = _cpu_s(proc.pid)
                    r = trio.run(_fetch_once, fhome, addr, sm.id, bulk)
                    r["provider_cpu_s"] = _cpu_s(proc.pid) - p0  # its start-up excluded
                finally:
                    proc.terminate()
                    proc.wait(10)
                console.print(f"run {i + 1} {kind}: {r['mb_per_s']:.1f} MB/s, {r['receipts']} receipts, "
                              f"paid {r['paid']}, CPU s fetcher {r['fetcher_cpu_s']:.2f} provider "
                              f"{r['provider_cpu_s']:.2f}", highlight=False)
                out[kind].append(r)
    med = {k: statistics.median(x["mb_per_s"] for x in v) for k, v in out.items()}
    cpu = {k: statistics.median(x["fetcher_cpu_s"] + x["provider_cpu_s"] for x in v) for k, v in out.items()}
    # each pair ran back to back (free first in even runs, paid first in odd ones): the median of the
    # pairs' ratios is less sensitive to load that changes between pairs than the ratio of medians
    pairs = [1 - p["mb_per_s"] / f["mb_per_s"] for f, p in zip(out["free"], out["paid"], strict=True)]
    return {"mb": mb, "runs": runs, "bulk": bulk, "fee_per_mib": FETCH_FEE, "runs_detail": out,
            "median_mb_per_s": med, "overhead_pct": round(100 * (1 - med["paid"] / med["free"]), 2),
            "pair_overhead_pct": round(100 * statistics.median(pairs), 2),
            "median_cpu_s": cpu, "cpu_overhead_pct": round(100 * (cpu["paid"] / cpu["free"] - 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="receipts per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lines", type=int, default=1, help="lines per receipt (1..64)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "receipts.json")
    ap.add_argument("--fetch-mb", type=int, default=0, help="also measure a fetch of this many MiB (0: skip)")
    ap.add_argument("--fetch-runs", type=int, default=3, help="fetches of each kind (free, paid)")
    ap.add_argument("--bulk", default="tls", choices=["tls", "tcp", "off"], help="fetch path")
    ap.add_argument("--credit-window", type=int, default=None, help="the paid provider's (default: its default)")
    args = ap.parse_args()
    runs = [run_once(args.n, args.lines, args.dir) for _ in range(args.runs)]
    title = f"receipts: {args.n} per run, {args.lines} line(s) each, {args.runs} runs, ledgers in {args.dir}"
    table = Table("operation", "min /s", "median /s", "max /s", title=title)
    result: dict[str, dict[str, float]] = {}
    for op in runs[0]:
        xs = [r[op] for r in runs]
        result[op] = {"min": round(min(xs), 1), "median": round(statistics.median(xs), 1), "max": round(max(xs), 1)}
        table.add_row(op, f"{min(xs):,.0f}", f"{statistics.median(xs):,.0f}", f"{max(xs):,.0f}")
    console.print(table)
    key = Ed25519PrivateKey.generate()
    ch = Channel.new(identity.public_bytes(key), b"\x02" * 32, "USD")
    sample = receipts.sign_receipt(key, ch, 1, 40 * args.lines, _lines(args.lines))
    console.print(f"receipt size with {args.lines} line(s): {len(sample.raw)} bytes")
    fetch = None
    if args.fetch_mb:
        fetch = fetch_overhead(args.fetch_mb, args.fetch_runs, args.dir, None if args.bulk == "off" else args.bulk,
                               args.credit_window)
        t = Table("fetch", "median MB/s", "runs MB/s", "receipts (paid)",
                  title=f"{args.fetch_mb} MiB from one provider, bulk {args.bulk}, fee {FETCH_FEE}/MiB")
        for kind in ("free", "paid"):
            rs = fetch["runs_detail"][kind]
            t.add_row(kind, f"{fetch['median_mb_per_s'][kind]:.1f}", ", ".join(f"{r['mb_per_s']:.1f}" for r in rs),
                      ", ".join(str(r["receipts"]) for r in rs))
        console.print(t)
        console.print(f"payment overhead: {fetch['overhead_pct']:.1f}% of throughput (median vs median), "
                      f"{fetch['pair_overhead_pct']:.1f}% (median of the {args.fetch_runs} free/paid pairs); "
                      f"CPU (fetcher + provider) {fetch['median_cpu_s']['free']:.2f} s free vs "
                      f"{fetch['median_cpu_s']['paid']:.2f} s paid: {fetch['cpu_overhead_pct']:+.1f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": args.n, "runs": args.runs, "lines": args.lines, "dir": str(args.dir),
                                    "receipt_bytes": len(sample.raw), "per_second": result, "fetch": fetch},
                                   indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
