"""The generation queue: bounded, and fair between requests.

Why chunks and round-robin: the model is one shared resource and runs in one worker thread. If each
request ran to completion, one 4,000-token answer would make every short question behind it wait for
all of it. Instead a generation advances `chunk` tokens at a time and goes to the back of the queue,
so N active generations share the model in turn; a short one finishes after a few turns whatever is
ahead of it. The first turn of a generation prefills its uncached prompt rest in one forward pass.

Bounded: at most `max_jobs` generations are queued or running; `submit` beyond that raises
`QueueFull` (the socket answers 503). A job whose consumer went away (client disconnected) is dropped
at its next turn and frees its slot. Greedy decoding token by token is the same computation whether
it runs in chunks or in one go, so chunking never changes the tokens.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kvnet.errors import KvnetError

# advance(n) -> (new tokens, done): runs in the worker thread
Advance = Callable[[int], tuple[list[int], bool]]


class QueueFull(KvnetError):
    """The generation queue holds its maximum; try again later (HTTP 503)."""


@dataclass
class QueueStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0
    turns: int = 0


class Job:
    """One generation in the queue; its tokens arrive on `receive`, chunk by chunk."""

    def __init__(self, advance: Advance) -> None:
        self.advance = advance
        self._send, self.receive = trio.open_memory_channel[list[int]](math.inf)
        self.cancelled = False
        self.gone = False  # the client disconnected
        self.error: BaseException | None = None
        self.turns = 0

    def cancel(self) -> None:
        """The consumer is gone: drop the job at its next turn."""
        self.cancelled = True
        self.receive.close()


class Scheduler:
    def __init__(self, max_jobs: int, chunk: int, limiter: trio.CapacityLimiter | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        """`limiter` is held while the model runs (publishing shares it); `on_depth` reports queue depth."""
        self.max_jobs, self.chunk = max_jobs, chunk
        self.limiter = limiter or trio.CapacityLimiter(1)
        self.on_depth = on_depth or (lambda n: None)
        self.stats = QueueStats()
        self._ready: deque[Job] = deque()
        self._active = 0
        self._wake = trio.Event()

    @property
    def active(self) -> int:
        return self._active

    def submit(self, advance: Advance) -> Job:
        if self._active >= self.max_jobs:
            self.stats.rejected += 1
            raise QueueFull(f"the generation queue is full ({self.max_jobs} queued or running); retry later")
        job = Job(advance)
        self._active += 1
        self.stats.submitted += 1
        self.on_depth(self._active)
        self._ready.append(job)
        self._wake.set()
        return job

    def _finish(self, job: Job, outcome: str) -> None:
        self._active -= 1
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        self.on_depth(self._active)
        job._send.close()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve the queue forever (cancel to stop); one turn of one job at a time."""
        task_status.started()
        while True:
            if not self._ready:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            job = self._ready.popleft()
            if job.cancelled:
                self._finish(job, "cancelled")
                continue
            await self._turn(job)

    async def _turn(self, job: Job) -> None:
        self.stats.turns += 1
        job.turns += 1
        try:
            tokens, done = await trio.to_thread.run_sync(job.advance, self.chunk, limiter=self.limiter)
        except Exception as exc:  # noqa: BLE001 - reported to this request only; the queue goes on
            job.error = exc
            self._finish(job, "failed")
            return
        if tokens and not job.cancelled:
            try:
                job._send.send_nowait(tokens)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                job.cancelled = True
        if job.cancelled:
            self._finish(job, "cancelled")
        elif done:
            self._finish(job, "completed")
        else:
            self._ready.append(job)
