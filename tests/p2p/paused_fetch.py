"""A fetching process that stops taking pieces at a known point, for the SIGKILL tests.

Killing a fetch "mid-transfer" by timing is a race: the bulk receiver and the group writer's
threads store whole grants in milliseconds, so a kill sent after the n-th progress report may
land after the last piece. These tests instead make the fetching process hold every verified
piece after the first `after` at the door (`Fetch.offer`, where the receiver hands pieces to
the store) until a gate file appears. The store then holds exactly `after` pieces; the
providers have sent at most the grants outstanding beyond them, which the tests size to be
fewer than the artifact's pieces. Nothing else changes: the wire, the verification and the
writer are the real ones.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from kvnet.p2p import fetcher


def pause_offers_after(after: int, gate: Path) -> None:
    """Patch this process's `Fetch.offer` so that the (after+1)-th and later pieces wait for `gate`."""
    real = fetcher.Fetch.offer
    lock, seen = threading.Lock(), [0]

    def offer(self, p, i, data) -> None:  # noqa: ANN001 - the signature of Fetch.offer
        with lock:
            seen[0] += 1
            held = seen[0] > after
        while held and not gate.exists():
            time.sleep(0.01)
        real(self, p, i, data)

    fetcher.Fetch.offer = offer
