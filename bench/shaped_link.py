"""The bulk path on a shaped link: providers and a fetcher in network namespaces, joined by veth
pairs through a bridge, with links rate-limited by tbf; MB/s against plain TCP on the same shaped
link, and bytes received over the artifact's size.

    .venv/bin/python -m bench.shaped_link --rates 100mbit,1gbit --mb 40 --runs 3     (as root)
    .venv/bin/python -m bench.shaped_link --shape providers --rates 100mbit --runs 3  (as root)

Topology: namespaces kvsh-sw (a bridge), kvsh-f (the fetcher), kvsh-p1, kvsh-p2 and kvsh-p3 (`kvnet
serve` processes holding the same signed artifact); each has one veth pair to the bridge (MTU 1500).
A shaped link has both directions shaped: a tbf qdisc on the bridge's port towards the namespace and
one on the namespace's own veth, at `--rate`, burst max(32 KiB, rate / 250 s), 20 ms of queue.

- `--shape fetcher` (default): only the fetcher's link is shaped, the bottleneck of a client on a
  last-mile link; the fetch uses 2 providers.
- `--shape providers`: every provider's link is shaped and the fetcher's is not, as when each
  provider's upload is the limit; fetches from 1 and from 3 providers, so the table shows what
  more providers buy where the link, not this machine's 2 shared cores, is the limit.

Delay is not emulated: this machine's kernel has neither `netem` nor `fq` (which would allow an
earliest-departure-time delay from a BPF classifier), only `tbf` and `htb`, which shape rate. A
userspace relay that delays bytes is not the same thing (it terminates TCP, so the sender's
congestion window and slow start would see a short loopback path, not a long one), so it is not
used: these figures are for rate-limited links with sub-millisecond RTT only.

"plain TCP" is one TCP stream from a process in kvsh-p1 to one in kvsh-f over the same shaped link
(1 MiB writes), the ceiling any fetch over it can reach. Each fetch row is a fresh fetcher node in
kvsh-f (bench/transfer.py's `fetch_once`: verify + durable store) fetching from both providers.
Writes bench/out/shaped_link.json (`--shape providers`: bench/out/shaped_link_providers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NS_SW, NS_F, NS_P = "kvsh-sw", "kvsh-f", ("kvsh-p1", "kvsh-p2", "kvsh-p3")
SUBNET = "10.78.0"
IP_F = f"{SUBNET}.2"
IP_P = (f"{SUBNET}.11", f"{SUBNET}.12", f"{SUBNET}.13")
PROVIDER_COUNTS = {"fetcher": (2,), "providers": (1, 3)}  # the fetch rows of each --shape
SENDER = r"""
import socket, sys
data = bytes(1 << 20)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for _ in range(int(sys.argv[3])):
    s.sendall(data)
s.close()
"""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def in_ns(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


# -- the namespaces -------------------------------------------------------------------------------

def teardown() -> None:
    for ns in (NS_SW, NS_F, *NS_P):
        sh("ip", "netns", "del", ns, check=False)


def setup() -> None:
    """The bridge namespace, and the fetcher and providers each with a veth pair to the bridge."""
    teardown()
    for ns in (NS_SW, NS_F, *NS_P):
        sh("ip", "netns", "add", ns)
        sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
    sh(*in_ns(NS_SW, "ip", "link", "add", "br0", "type", "bridge"))
    sh(*in_ns(NS_SW, "ip", "link", "set", "br0", "up"))
    ports = [(NS_F, IP_F, "f")] + [(p, a, f"p{n + 1}") for n, (p, a) in enumerate(zip(NS_P, IP_P, strict=True))]
    for ns, ip, port in ports:
        sh(*in_ns(NS_SW, "ip", "link", "add", f"sw-{port}", "type", "veth", "peer", "name", "eth0", "netns", ns))
        sh(*in_ns(NS_SW, "ip", "link", "set", f"sw-{port}", "master", "br0", "up"))
        sh(*in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0"))
        sh(*in_ns(ns, "ip", "link", "set", "eth0", "up"))


def _links(where: str) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The (bridge end, namespace end) of each link `--shape` names."""
    if where == "fetcher":
        return [((NS_SW, "sw-f"), (NS_F, "eth0"))]
    return [((NS_SW, f"sw-p{n + 1}"), (ns, "eth0")) for n, ns in enumerate(NS_P)]


def shape(rate: str, where: str) -> None:
    """tbf at `rate` on both directions of the links `where` names."""
    bits = _rate_bits(rate)
    burst = max(32 * 1024, bits // 8 // 250)
    for link in _links(where):
        for ns, dev in link:
            sh(*in_ns(ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
                      "latency", "20ms"))


def _rate_bits(rate: str) -> int:
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3}
    for unit, mult in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * mult)
    raise SystemExit(f"rate {rate!r}: use e.g. 100mbit or 1gbit")


@contextmanager
def providers(tmp: Path, mb: int):
    """One `kvnet serve` process per provider namespace, each holding the same artifact."""
    from tests.artifacts import fake_artifact, provider_home

    sm, pieces = fake_artifact(9, mb, kv_shape=(28, 8, 128))
    procs, addrs = [], []
    try:
        for n, (ns, ip) in enumerate(zip(NS_P, IP_P, strict=True)):
            home = provider_home(tmp, f"P{n + 1}", sm, pieces)
            args = [sys.executable, "-m", "kvnet.cli", "serve", "--home", str(home), "--listen", f"/ip4/{ip}/tcp/4001"]
            if addrs:
                args += ["--bootstrap", addrs[0]]
            proc = subprocess.Popen(in_ns(ns, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=_env())
            first = proc.stdout.readline().split()
            if not first or first[0] != "listening":
                raise SystemExit(f"kvnet serve in {ns} did not start: {proc.stderr.read()}")
            procs.append(proc)
            addrs.append(first[1])
        yield sm, addrs
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


# -- inside the fetcher's namespace ---------------------------------------------------------------

def raw_tcp(mb: int) -> float:
    """MB/s of one TCP stream from kvsh-p1 to here (over the shaped link, or through one shaped
    provider link)."""
    srv = socket.socket()
    srv.bind((IP_F, 0))
    srv.listen(1)
    from bench.transfer import receive_all

    proc = subprocess.Popen(in_ns(NS_P[0], sys.executable, "-c", SENDER, IP_F, str(srv.getsockname()[1]), str(mb)))
    return receive_all(srv, proc)


def inner(args: argparse.Namespace) -> None:
    """Runs in kvsh-f: plain TCP, then the fetches of `--shape`'s provider counts; one JSON line."""
    import trio

    from bench.transfer import fetch_once

    out: dict[str, dict] = {"plain TCP": {"runs": [raw_tcp(args.mb) for _ in range(args.runs)]}}
    tmp = Path(tempfile.mkdtemp(prefix="kvnet-shaped-"))
    try:
        for label, bulk in (("bulk tcp", "tcp"), ("bulk tls", "tls"), ("libp2p streams", None)):
            for n in PROVIDER_COUNTS[args.shape]:
                runs, rx = [], []
                for r in range(args.runs):
                    res = trio.run(fetch_once, tmp / f"C-{bulk}-{n}-{r}", args.bootstrap, bytes.fromhex(args.mid),
                                   n, 4, 8, bulk)
                    runs.append(res["mb_s"])
                    rx.append(res["received"])
                    print(f"  {args.shape} {args.rate} {label} x{n} run {r + 1}: {res['mb_s']:.1f} MB/s, received "
                          f"{res['received']:.3f}x {res['per_provider']}", file=sys.stderr, flush=True)
                out[f"{label}, {n} provider{'s' if n > 1 else ''} (verify + store)"] = {"runs": runs, "received": rx}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out), flush=True)


# -- the driver -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100mbit,1gbit", help="comma-separated tbf rates")
    ap.add_argument("--mb", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shape", choices=sorted(PROVIDER_COUNTS), default="fetcher",
                    help="whose links are shaped: the fetcher's, or every provider's")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "shaped_link.json")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--mid", help=argparse.SUPPRESS)
    ap.add_argument("--rate", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("network namespaces need root")
    results: dict[str, dict] = {}
    setup()
    try:
        with tempfile.TemporaryDirectory(prefix="kvnet-shaped-") as d, providers(Path(d), args.mb) as (sm, addrs):
            for rate in args.rates.split(","):
                shape(rate, args.shape)
                proc = subprocess.run(in_ns(NS_F, sys.executable, "-m", "bench.shaped_link", "--inner", "--bootstrap",
                                            addrs[0], "--mid", sm.id.hex(), "--mb", str(args.mb), "--runs",
                                            str(args.runs), "--rate", rate, "--shape", args.shape),
                                      stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT, check=True)
                results[rate] = json.loads(proc.stdout.strip().splitlines()[-1])
                results[rate]["artifact_bytes"] = sm.manifest.total_bytes
    finally:
        teardown()
    report(results, args)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("link", "path", "min MB/s", "median MB/s", "max MB/s", "median / plain TCP", "received (max)",
                  title=f"{args.mb} MiB, {args.runs} runs, tbf-shaped {args.shape} link(s), no added delay")
    for rate, rows in results.items():
        plain = statistics.median(rows["plain TCP"]["runs"])
        for name, row in rows.items():
            if name == "artifact_bytes":
                continue
            runs = row["runs"]
            row.update(min=min(runs), median=statistics.median(runs), max=max(runs),
                       ratio_to_plain_tcp=statistics.median(runs) / plain)
            rx = f"{max(row['received']):.3f}x" if "received" in row else ""
            table.add_row(rate, name, f"{min(runs):.1f}", f"{statistics.median(runs):.1f}", f"{max(runs):.1f}",
                          f"{statistics.median(runs) / plain:.2f}", rx)
    Console(width=200).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out if args.shape == "fetcher" else args.out.with_name(f"{args.out.stem}_{args.shape}.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
