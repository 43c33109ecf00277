"""Issue 7's attacks on a separate victim process, with an honest `kvnet fetch` process after each.

    .venv/bin/python -m bench.attacks [--quick] [--json OUT] [--md OUT]

Processes (all on loopback, each its own Python process):
- V, the victim: `kvnet serve --stats-file V/stats.json` holding artifact Y (the one the flood draws),
  its stderr written to a file; every figure about the victim comes from its stats file
  (kvnet.p2p.stats) and that file, never from inside the benchmark.
- P, an honest provider: `kvnet serve --bootstrap V` holding artifact X (the one the liars target).
  V's and P's identities are in the far half of the key space around X's manifest id, as in
  tests/p2p/test_attack_lookup.py, so that liars closer to it are cheap to grind.
- one attacker process per group, and after each group a fresh `kvnet fetch --bootstrap V` process
  (fresh home, fresh identity) of X (of Y after the flood), timed from spawn to exit.

Groups: (a) churn: fresh identities connect and disconnect (tests/p2p/test_attack_churn.py run as
a script), V's slots, connections, fds, tasks and RSS before and after; (b) DHT stalls: streams that
are idle, drip a byte a second, are truncated, or never read, re-opened as soon as V ends them, while
an honest process runs DHT lookups through V; (c) lying providers, 3 then 20 (--quick: 3); (d) an
offer and pieces flood. For each group: V's stderr bytes and lines added, and whether V is alive.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.artifacts import fake_artifact  # noqa: E402
from tests.p2p.test_attack_lookup import _far_key  # noqa: E402

FULL = {"churn": 1000, "churn_concurrency": 32, "stall_streams": 24, "stall_identities": 4, "lookup_rounds": 12,
        "lookup_spread_s": 24, "liars": [3, 20], "flood_attackers": 4, "flood_streams": 20, "x_mb": 8, "y_mb": 4}
QUICK = {"churn": 200, "churn_concurrency": 32, "stall_streams": 24, "stall_identities": 4, "lookup_rounds": 4,
         "lookup_spread_s": 12, "liars": [3], "flood_attackers": 2, "flood_streams": 20, "x_mb": 2, "y_mb": 4}
STATS_INTERVAL_S = 0.5
SETTLE_TIMEOUT_S = 30.0
FETCH_TIMEOUT_S = 180.0
STAT_KEYS = ("inbound_slots_in_use", "connections", "streams_open", "fds_open", "trio_tasks", "rss_mb",
             "peerstore_peers", "routing_table_peers", "dht_refused", "dht_timed_out", "serve_refused", "peers_scored")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}


def _kvnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvnet.cli", *args]


def _write_key(path: Path, key) -> None:
    """An identity file as `kvnet keygen` writes it, for a chosen key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _home(tmp: Path, name: str, key, artifacts: list) -> Path:
    from kvnet.store import Store

    home = tmp / name
    _write_key(home / "identity.key", key)
    with Store(home / "store") as store:
        for sm, pieces in artifacts:
            store.put_manifest(sm.raw)
            store.put_pieces(sm.id, list(enumerate(pieces)))
    return home


class Victim:
    """The `kvnet serve` process under attack: its stats file and its stderr file."""

    def __init__(self, home: Path) -> None:
        self.home, self.stats_path, self.err_path = home, home / "stats.json", home / "stderr.log"
        self.err = open(self.err_path, "wb")  # noqa: SIM115 - open for the process's whole life
        self.proc = subprocess.Popen(_kvnet("serve", "--home", str(home), "--stats-file", str(self.stats_path),
                                            "--stats-interval", str(STATS_INTERVAL_S)),
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=_env(), cwd=ROOT)
        first = self.proc.stdout.readline().split()
        if not first or first[0] != "listening":
            raise RuntimeError(f"victim did not start: {self.err_path.read_text()[-2000:]}")
        self.addr = first[1]
        self.peer = self.addr.rsplit("/", 1)[1]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self) -> dict[str, Any]:
        """The stats file as last written (waiting for the first write)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return json.loads(self.stats_path.read_text())
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def fresh_stats(self) -> dict[str, Any]:
        """A snapshot written after this call (so it reflects the present)."""
        t = time.time()
        while True:
            s = self.stats()
            if s["time"] > t or not self.alive():
                return s
            time.sleep(STATS_INTERVAL_S / 4)

    def settled(self, base: dict[str, Any]) -> dict[str, Any]:
        """Wait until slots and connections are back to `base` (or SETTLE_TIMEOUT_S), then snapshot."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline and self.alive():
            s = self.fresh_stats()
            if s["inbound_slots_in_use"] <= base["inbound_slots_in_use"] and s["connections"] <= base["connections"]:
                break
        time.sleep(1.0)
        return self.fresh_stats()

    def stderr_size(self) -> tuple[int, int]:
        data = self.err_path.read_bytes()
        return len(data), data.count(b"\n")

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.err.close()


def _fetch(tmp: Path, name: str, victim: Victim, manifest_id: bytes) -> dict[str, Any]:
    """A fresh `kvnet fetch --bootstrap V --manifest ID --json` process: its outcome and wall time."""
    from kvnet import identity

    home = tmp / "fetchers" / name
    identity.generate(home / "identity.key")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(_kvnet("fetch", "--home", str(home), "--bootstrap", victim.addr, "--manifest",
                                     manifest_id.hex(), "--json"), capture_output=True, text=True, env=_env(),
                              cwd=ROOT, timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {FETCH_TIMEOUT_S:g} s", "wall_s": FETCH_TIMEOUT_S}
    wall = time.perf_counter() - t0
    try:
        summary = json.loads(proc.stdout)
    except ValueError:
        summary = {"ok": False, "error": proc.stderr.strip().splitlines()[-1:] or ["no output"]}
    return {"ok": proc.returncode == 0 and bool(summary.get("ok")), "rc": proc.returncode, "wall_s": round(wall, 2),
            "transfer_s": summary.get("seconds"), "fetched": summary.get("fetched"), "error": summary.get("error"),
            "providers": sorted(summary.get("providers") or {}), "stderr_lines": len(proc.stderr.splitlines()),
            "stderr_tail": proc.stderr[-1500:]}


def _attacker(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench._attackers", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def _ready(proc: subprocess.Popen, timeout: float = 120.0) -> dict[str, Any]:
    """Wait for the attacker's `{"ready": ...}` line."""
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout)
        raise RuntimeError(f"attacker exited before it was ready: {proc.stderr.read()[-3000:]}")
    return json.loads(line)


def _finish(proc: subprocess.Popen, timeout: float = 60.0) -> dict[str, Any]:
    """End a long-running attacker (close its stdin) and read its result line."""
    out, err = proc.communicate(input="", timeout=timeout)
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"attacker failed ({proc.returncode}): {err[-3000:]}")
    return json.loads(lines[-1])


def _run_once(args: list[str], timeout: float = 300.0) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"attacker failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Run:
    """One benchmark run: the processes, the groups, the results."""

    def __init__(self, cfg: dict[str, Any], tmp: Path, log=print) -> None:
        self.cfg, self.tmp, self.log = cfg, tmp, log
        self.x = fake_artifact(171, cfg["x_mb"], piece_size=256 * 1024)
        self.y = fake_artifact(172, cfg["y_mb"], piece_size=64 * 1024)  # 64 pieces: what the flood asks for
        x_id = self.x[0].id
        self.victim = Victim(_home(tmp, "V", _far_key(x_id), [self.y]))
        p_home = _home(tmp, "P", _far_key(x_id), [self.x])
        self.provider = subprocess.Popen(_kvnet("serve", "--home", str(p_home), "--bootstrap", self.victim.addr),
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
                                         cwd=ROOT)
        line = self.provider.stdout.readline().split()
        if not line or line[0] != "listening":
            raise RuntimeError("provider did not start")
        self.provider_peer = line[1].rsplit("/", 1)[1]
        self._wait_announced()
        self.groups: list[dict[str, Any]] = []
        self.fetches = 0

    def _wait_announced(self) -> None:
        deadline = time.monotonic() + 30
        while self.victim.fresh_stats()["dht_provider_entries"] < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the provider's records never reached the victim")

    def group(self, name: str, attack, manifest: bytes | None = None) -> dict[str, Any]:
        """Run one attack group: stats and stderr before and after, then the honest fetch."""
        self.log(f"[{name}] ...")
        before = self.victim.fresh_stats()
        err0 = self.victim.stderr_size()
        t0 = time.perf_counter()
        result = attack(before)
        seconds = time.perf_counter() - t0
        after = self.victim.settled(before)
        alive = self.victim.alive()
        self.fetches += 1
        fetch = _fetch(self.tmp, f"F{self.fetches}", self.victim, manifest or self.x[0].id)
        err1 = self.victim.stderr_size()
        g = {"group": name, "attack": result, "attack_s": round(seconds, 1), "victim_alive": alive and
             self.victim.alive(), "before": {k: before[k] for k in STAT_KEYS},
             "after": {k: after[k] for k in STAT_KEYS}, "fetch_after": fetch,
             "stderr_bytes_added": err1[0] - err0[0], "stderr_lines_added": err1[1] - err0[1]}
        self.groups.append(g)
        self.log(f"[{name}] done in {seconds:.1f} s; fetch after: ok={fetch['ok']} {fetch['wall_s']} s; "
                 f"stderr +{g['stderr_lines_added']} lines")
        return g

    def churn(self, _before) -> dict[str, Any]:
        return _run_once([str(ROOT / "tests" / "p2p" / "test_attack_churn.py"), self.victim.addr,
                          str(self.cfg["churn"]), str(self.cfg["churn_concurrency"])])

    def stall(self, _before) -> dict[str, Any]:
        proc = _attacker(["stall", self.victim.addr, str(self.cfg["stall_streams"]),
                          str(self.cfg["stall_identities"])])
        try:
            _ready(proc)
            during = self.victim.fresh_stats()
            looked = _run_once(["-m", "bench._attackers", "lookups", self.victim.addr, self.x[0].id.hex(),
                                self.provider_peer, str(self.cfg["lookup_rounds"]), str(self.cfg["lookup_spread_s"])])
            end = self.victim.fresh_stats()
        finally:
            stalled = _finish(proc)
        return {**stalled, "lookups": looked, "victim_streams_at_start": during["streams_open"],
                "victim_streams_at_end": end["streams_open"],
                "victim_dht_refused": end["dht_refused"] - during["dht_refused"],
                "victim_dht_timed_out": end["dht_timed_out"] - during["dht_timed_out"]}

    def liars(self, count: int):
        def attack(_before) -> dict[str, Any]:
            proc = _attacker(["liars", self.victim.addr, self.x[0].id.hex(), str(count)])
            try:
                _ready(proc)
                self.fetches += 1
                fetch = _fetch(self.tmp, f"F{self.fetches}-during", self.victim, self.x[0].id)
            finally:
                held = _finish(proc)
            return {**held, "fetch_during": fetch}
        return attack

    def flood(self, _before) -> dict[str, Any]:
        return _run_once(["-m", "bench._attackers", "flood", self.victim.addr, self.y[0].id.hex(),
                          str(self.cfg["flood_attackers"]), str(self.cfg["flood_streams"])])

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.group("baseline", lambda _b: {})
        self.group(f"churn of {self.cfg['churn']} peers", self.churn)
        self.group(f"{self.cfg['stall_streams']} stalled DHT streams", self.stall)
        for count in self.cfg["liars"]:
            self.group(f"{count} lying providers", self.liars(count))
        self.group("offer + pieces flood", self.flood, manifest=self.y[0].id)
        err = self.victim.stderr_size()
        return {"config": self.cfg, "groups": self.groups, "victim_alive": self.victim.alive(),
                "victim_stats_last": self.victim.fresh_stats(),
                "victim_stderr_bytes": err[0], "victim_stderr_lines": err[1],
                "victim_stderr_tail": self.victim.err_path.read_text(errors="replace")[-4000:],
                "seconds": round(time.perf_counter() - t0, 1)}

    def stop(self) -> None:
        if self.provider.poll() is None:
            self.provider.terminate()
            try:
                self.provider.wait(15)
            except subprocess.TimeoutExpired:
                self.provider.kill()
        self.victim.stop()


def _summary(g: dict[str, Any]) -> str:
    """The group's attack in one line (what it did and what the victim did with it)."""
    a = g["attack"]
    if "connected" in a:
        return f"{a['connected']} connected, {a['failed']} refused"
    if "lookups" in a:
        lk = a["lookups"]
        med = sorted(lk["direct_s"])[len(lk["direct_s"]) // 2] if lk["direct_s"] else float("nan")
        medf = sorted(lk["find_s"])[len(lk["find_s"]) // 2] if lk["find_s"] else float("nan")
        return (f"{a['streams']} stalls from {a['identities']} peers held {a['held_s']} s (V reset "
                f"{a['victim_dht_refused']}, {a['victim_dht_timed_out']} by its deadline); GET_PROVIDERS via V "
                f"{lk['direct_ok']}/{lk['rounds']} ok, median {med * 1000:.0f} ms; find_manifest "
                f"{lk['find_ok']}/{lk['rounds']} ok, median {medf * 1000:.0f} ms")
    if "liars" in a:
        f = a["fetch_during"]
        return f"fetch during the attack: ok={f['ok']} in {f['wall_s']} s (transfer {f['transfer_s']} s)"
    if "drawn_mib" in a:
        ends = ", ".join(f"{k} {v}" for k, v in sorted(a["ends"].items()))
        return (f"{a['attackers']} attackers, {a['pieces_streams']} pieces streams asking "
                f"{a['asked_artifacts'] * 4} MiB: drew {a['drawn_mib']} MiB ({ends}); "
                f"{a['offers_answered']}/{a['offers']} offers answered")
    return "-"


def _delta(g: dict[str, Any], key: str) -> str:
    return f"{g['before'][key]} → {g['after'][key]}"


COLUMNS = ("group", "attack", "V alive", "fetch after", "slots", "conns", "fds", "tasks", "RSS MB",
           "stderr +B / +lines")


def _rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for g in report["groups"]:
        f = g["fetch_after"]
        fetch = f"ok, {f['wall_s']} s" if f["ok"] else f"FAILED: {f['error']}"
        rows.append([g["group"], _summary(g), "yes" if g["victim_alive"] else "NO", fetch,
                     _delta(g, "inbound_slots_in_use"), _delta(g, "connections"), _delta(g, "fds_open"),
                     _delta(g, "trio_tasks"), _delta(g, "rss_mb"),
                     f"{g['stderr_bytes_added']} / {g['stderr_lines_added']}"])
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in _rows(report)]
    lines.append("")
    lines.append(f"Victim stderr over the whole run: {report['victim_stderr_bytes']} bytes, "
                 f"{report['victim_stderr_lines']} lines; run took {report['seconds']} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts (churn 200, 3 liars only)")
    ap.add_argument("--json", type=Path, help="write the full report as JSON here")
    ap.add_argument("--md", type=Path, help="write the table as Markdown here")
    args = ap.parse_args(argv)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="kvnet-attacks-") as tmp:
        run = Run(QUICK if args.quick else FULL, Path(tmp),
                  log=lambda m: console.print(m, markup=False, highlight=False))
        try:
            report = run.run()
        finally:
            run.stop()
    table = Table(title="issue 7 attacks on a separate `kvnet serve` victim")
    for c in COLUMNS:
        table.add_column(c)
    for row in _rows(report):
        table.add_row(*row)
    Console(width=240).print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
