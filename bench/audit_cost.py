"""What an audit costs: one block of prefill attending to j blocks, against a full prefill.

    .venv/bin/python -m bench.audit_cost [--model qwen3-0.6b-shape] [--lengths 1024 2048] [--runs 3]

For each document length N (blocks of 256): the time of a full one-pass prefill of N tokens (what
publishing costs, and what a consumer without the artifact would pay), of a block-by-block prefill
(what publishing would cost if artifacts were computed as audits recompute them), and of auditing the
last block and the first block (artifact loaded from its bytes, block j prefilled on top of blocks
0..j-1, compared). Prints a table and one JSON line; medians of --runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import artifact, audit
from kvnet.engine import Engine
from tests.conftest import random_tokens

CPU: list[float] = []  # CPU seconds (process_time, all threads) of the last _median call's runs


def _median(fn, runs: int) -> float:
    """Median wall seconds of `fn`; the median CPU seconds go to CPU[-1] (comparable on a loaded
    machine, where wall time is not: another process's work does not count)."""
    times, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    CPU.append(statistics.median(cpu))
    return statistics.median(times)


def _prefill_blockwise(engine, doc, block_size):
    """The artifact an audit reproduces bitwise: each block prefilled on top of the blocks before it."""
    kv = None
    for start in range(0, len(doc), block_size):
        kv = engine.prefill(doc[start : start + block_size], kv=kv)
    return kv


def _audit_time(engine, m, doc, j, pieces, runs):
    """(median seconds, the last BlockAudit) of auditing block j."""
    seen = []
    t = _median(lambda: seen.append(audit.audit_block(engine, m, doc, j, lambda i: pieces[i])), runs)
    return t, seen[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b-shape")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    engine = Engine(args.model, args.dtype)
    key = Ed25519PrivateKey.generate()
    rows = []
    for n in args.lengths:
        doc = random_tokens(n, seed=n, vocab=min(engine.model.config.vocab_size, 150000))
        full = _median(lambda doc=doc: engine.prefill(doc), args.runs)
        full_cpu = CPU[-1]
        blockwise = _median(lambda doc=doc: _prefill_blockwise(engine, doc, args.block_size), args.runs)
        data = artifact.kv_to_bytes(engine.prefill(doc), engine.layout, args.block_size)
        sm = artifact.build_manifest(engine, doc, data, key, block_size=args.block_size)
        pieces = [bytes(p) for p in artifact.split_pieces(data)]
        last = len(sm.manifest.chain) - 1
        results, cpu = {}, {}
        for j in (0, last):
            results[j] = _audit_time(engine, sm.manifest, doc, j, pieces, args.runs)
            cpu[j] = CPU[-1]
        rows.append({"n_tokens": n, "blocks": last + 1, "full_prefill_s": round(full, 4),
                     "blockwise_prefill_s": round(blockwise, 4),
                     "audit_last_s": round(results[last][0], 4), "audit_first_s": round(results[0][0], 4),
                     "last_fraction": round(results[last][0] / full, 4),
                     "first_fraction": round(results[0][0] / full, 4),
                     "last_verdict": results[last][1].verdict, "last_rel": results[last][1].rel,
                     "full_prefill_cpu_s": round(full_cpu, 4), "audit_last_cpu_s": round(cpu[last], 4),
                     "audit_first_cpu_s": round(cpu[0], 4), "last_cpu_fraction": round(cpu[last] / full_cpu, 4),
                     "first_cpu_fraction": round(cpu[0] / full_cpu, 4)})
    print(f"{args.model} {args.dtype}, blocks of {args.block_size}, {torch.get_num_threads()} threads, "
          f"median of {args.runs}")
    print(f"{'tokens':>7} {'full prefill s':>15} {'block-wise s':>13} {'audit last s':>13} {'fraction':>9} "
          f"{'audit first s':>14} {'fraction':>9}  verdict (rel)")
    for r in rows:
        print(f"{r['n_tokens']:>7} {r['full_prefill_s']:>15.3f} {r['blockwise_prefill_s']:>13.3f} "
              f"{r['audit_last_s']:>13.3f} {r['last_fraction']:>9.3f} {r['audit_first_s']:>14.3f} "
              f"{r['first_fraction']:>9.3f}  {r['last_verdict']} ({r['last_rel']:.3g})")
    print(f"CPU seconds (process_time): {'tokens':>7} {'full prefill':>13} {'audit last':>11} {'fraction':>9} "
          f"{'audit first':>12} {'fraction':>9}")
    for r in rows:
        print(f"{'':>28}{r['n_tokens']:>7} {r['full_prefill_cpu_s']:>13.3f} {r['audit_last_cpu_s']:>11.3f} "
              f"{r['last_cpu_fraction']:>9.3f} {r['audit_first_cpu_s']:>12.3f} {r['first_cpu_fraction']:>9.3f}")
    print(json.dumps({"model": args.model, "dtype": args.dtype, "block_size": args.block_size,
                      "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
