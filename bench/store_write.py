"""Store write throughput of the data-file layout (one file per artifact, one fdatasync per group),
buffered and O_DIRECT, through `put_pieces` and through the group writer a fetch uses.

    .venv/bin/python bench/store_write.py --mb 256 --runs 3 --group 16

Each run writes one fresh artifact of seeded bytes (tests.artifacts.fake_artifact) into an empty store
in groups of --group pieces with `put_pieces(..., verified=True)`: the store's own cost, as the fetcher
paid it after verifying each piece on arrival. The "group writer" row submits every piece to
`Store.group_writer` (kvnet/store_writer.py: writer threads + a committer, as a fetch does now) and
closes it; the "aligned buffers" row submits the pieces in page-aligned buffers (anonymous mmaps, as
the bulk receiver reads them), so they are written with O_DIRECT as they are and runs of consecutive
queued pieces go out as one pwritev (kvnet.store_writer.COALESCE). One row also hashes every piece
(verified=False). Every figure is durable: a group is on
stable storage and marked present before it counts. (The old one-file-per-piece layout, measured
at ~145 MB/s when it was replaced, is no longer benchmarked: tests/store_v1.py only writes it.)
Prints min/median/max MB/s (MB = 10^6 B) and writes bench/out/store_write.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvnet.store import Store  # noqa: E402
from tests.artifacts import fake_artifact  # noqa: E402

console = Console(width=160)


def _aligned_copy(piece: bytes) -> memoryview:
    buf = mmap.mmap(-1, len(piece))
    buf[:] = piece
    return memoryview(buf)


def write_once(make_store, root: Path, sm, pieces: list[bytes], group: int, verified: bool | str | None = True
               ) -> float:
    """MB/s of storing every piece in groups (the manifest is stored first and not timed);
    `verified=None`: through the group writer; "aligned": the same from page-aligned buffers (the
    copies into them are made inside the timed loop, as a receiver's reads would fill them)."""
    with make_store(root) as store:
        store.put_manifest(sm.raw)
        t0 = time.perf_counter()
        if verified is None or verified == "aligned":
            w = store.group_writer(sm.id, group=group)
            for i, piece in enumerate(pieces):
                w.submit(i, _aligned_copy(piece) if verified == "aligned" else piece)
            w.flush()
            w.close()
        for g in range(0, len(pieces) if verified in (True, False) else 0, group):
            stored, errors = store.put_pieces(sm.id, [(i, pieces[i]) for i in range(g, min(g + group, len(pieces)))],
                                              verified=verified)
            assert stored and not errors
        dt = time.perf_counter() - t0
        assert store.missing_pieces(sm.id) == []
    return sm.manifest.total_bytes / dt / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--group", type=int, default=16, help="pieces per put_pieces call (one fdatasync each)")
    ap.add_argument("--only", default="", help="run only the rows whose name contains this")
    ap.add_argument("--dir", type=Path, default=None, help="where the stores go (default: the system temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "store_write.json")
    args = ap.parse_args()

    sm, pieces = fake_artifact(7, args.mb, kv_shape=(28, 8, 128))
    mib = sm.manifest.total_bytes / 2**20
    console.print(f"artifact: {mib:.0f} MiB in {len(pieces)} pieces, groups of {args.group}")
    cases = {
        "data file, buffered pwrite + fdatasync": (lambda r: Store(r, direct_io=False), True),
        "data file, O_DIRECT where supported + fdatasync": (lambda r: Store(r, direct_io=None), True),
        "data file, O_DIRECT, BLAKE3-verifying each piece": (lambda r: Store(r, direct_io=None), False),
        "group writer: O_DIRECT, 4 writer threads, committer": (lambda r: Store(r), None),
        "group writer from aligned buffers (a bulk fetch's path)": (lambda r: Store(r), "aligned"),
    }
    cases = {k: v for k, v in cases.items() if args.only in k}
    rows: dict[str, list[float]] = {}
    for name, (make, verified) in cases.items():
        runs = []
        for r in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="kvnet-store-write-", dir=args.dir) as tmp:
                runs.append(write_once(make, Path(tmp) / "store", sm, pieces, args.group, verified))
            console.print(f"  {name}, run {r + 1}: {runs[-1]:.0f} MB/s")
        rows[name] = runs
    table = Table("store", "min MB/s", "median MB/s", "max MB/s",
                  title=f"durable store writes, {args.mb} MiB, groups of {args.group}")
    for name, runs in rows.items():
        table.add_row(name, f"{min(runs):.0f}", f"{statistics.median(runs):.0f}", f"{max(runs):.0f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({k: {"min": min(v), "median": statistics.median(v), "max": max(v), "runs": v}
                                    for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
