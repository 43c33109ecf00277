"""The generation queue itself (kvnet.daemon.scheduler), in one trio loop with its worker thread:
round-robin turns of `chunk` tokens, a bounded number of jobs, cancelled jobs dropped at their turn,
and a failing job reported to its own consumer only."""

from __future__ import annotations

import pytest
import trio

from kvnet.daemon.scheduler import QueueFull, Scheduler


def counter(name: str, total: int, log: list[str], fail_at: int | None = None):
    """advance(n): up to n more 'tokens' of a job of `total`, logging each turn."""
    state = {"done": 0}

    def advance(n: int) -> tuple[list[int], bool]:
        if fail_at is not None and state["done"] >= fail_at:
            raise RuntimeError(f"{name} broke")
        k = min(n, total - state["done"])
        state["done"] += k
        log.append(name)
        return list(range(k)), state["done"] >= total
    return advance


async def drain(job) -> int:
    n = 0
    async for tokens in job.receive:
        n += len(tokens)
    return n


@pytest.mark.trio
async def test_round_robin_short_job_finishes_first():
    log: list[str] = []
    sched = Scheduler(max_jobs=4, chunk=2)
    finished: list[str] = []
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        long_job = sched.submit(counter("long", 40, log))
        short_job = sched.submit(counter("short", 4, log))

        async def consume(name, job):
            await drain(job)
            finished.append(name)

        async with trio.open_nursery() as inner:
            inner.start_soon(consume, "long", long_job)
            inner.start_soon(consume, "short", short_job)
        n.cancel_scope.cancel()
    assert finished == ["short", "long"]
    assert log[:4] == ["long", "short", "long", "short"]  # turns alternate while both are queued
    assert sched.stats.completed == 2 and sched.active == 0


@pytest.mark.trio
async def test_bounded_cancel_and_failure():
    log: list[str] = []
    sched = Scheduler(max_jobs=2, chunk=1)
    a = sched.submit(counter("a", 1000, log))
    b = sched.submit(counter("b", 5, log, fail_at=2))
    with pytest.raises(QueueFull):
        sched.submit(counter("c", 1, log))
    assert sched.stats.rejected == 1
    a.cancel()  # its consumer went away before its first turn
    async with trio.open_nursery() as n:
        await n.start(sched.run)
        assert await drain(b) == 2 and isinstance(b.error, RuntimeError)
        while sched.active:
            await trio.sleep(0.01)
        ok = sched.submit(counter("d", 3, log))
        assert await drain(ok) == 3
        n.cancel_scope.cancel()
    assert "a" not in log  # a cancelled job never runs again
    assert (sched.stats.cancelled, sched.stats.failed, sched.stats.completed) == (1, 1, 1)
