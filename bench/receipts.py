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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="receipts per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lines", type=int, default=1, help="lines per receipt (1..64)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "receipts.json")
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": args.n, "runs": args.runs, "lines": args.lines, "dir": str(args.dir),
                                    "receipt_bytes": len(sample.raw), "per_second": result}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
