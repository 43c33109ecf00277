"""The group writer (kvnet/store_writer.py): pieces submitted from several threads are all stored,
made durable and marked present in groups; a process killed while it writes leaves only verified,
durable pieces marked, and a resumed writer completes the artifact; a failure reaches the submitter.

Real SQLite files, real data files, real threads and a real killed process (the kill is aimed with
RLIMIT_FSIZE as in tests/test_store_crash.py, whose soundness check these tests reuse).
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvnet import store_files
from kvnet.store import NotFoundError, Store
from kvnet.store_files import DataFiles
from kvnet.store_writer import WriterClosedError
from tests.artifacts import fake_artifact
from tests.test_store_crash import _present_in_index, unsound_present_pieces

ROOT = Path(__file__).resolve().parents[1]


def test_pieces_from_several_threads_are_stored_in_groups_and_reported_once(tmp_path):
    sm, pieces = fake_artifact(70, 20)
    commits: list[list[int]] = []
    released = []
    with Store(tmp_path) as store:
        store.put_manifest(sm.raw)
        w = store.group_writer(sm.id, reserve=sm.manifest.total_bytes, group=4,
                               on_commit=lambda batch: commits.append([x.index for x in batch]),
                               on_written=lambda i, data: released.append((i, bytes(data))))
        halves = [range(0, len(pieces), 2), range(1, len(pieces), 2)]
        threads = [threading.Thread(target=lambda r=r: [w.submit(i, pieces[i], tag="t") for i in r]) for r in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.close()
        stored = sorted(i for batch in commits for i in batch)
        assert stored == list(range(len(pieces)))  # every piece reported committed, exactly once
        assert all(len(batch) <= len(pieces) for batch in commits) and w.timers["groups"] == len(commits)
        assert sorted(released) == list(enumerate(pieces))  # every buffer handed back after its write, with its index
        assert store.missing_pieces(sm.id) == []
        assert store.check(deep=True) == []
        assert all(store.read_piece(sm.id, i, verify=True) == p for i, p in enumerate(pieces))
        again = store.group_writer(sm.id)
        assert again.submit(3, pieces[3]) is False  # already present: nothing queued
        again.close()


def _aligned(data: bytes) -> memoryview:
    """`data` in a page-aligned buffer (an anonymous mmap), as the bulk receiver reads pieces."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return memoryview(buf)


def test_pieces_in_aligned_buffers_are_written_in_runs_and_read_back_exactly(tmp_path):
    sm, pieces = fake_artifact(74, 40, piece_size=1 << 16)  # 40 pieces, the last one short
    order = list(range(len(pieces)))
    random.Random(74).shuffle(order[: len(order) // 2])  # a shuffled half, then runs in order
    with Store(tmp_path) as store:
        store.put_manifest(sm.raw)
        w = store.group_writer(sm.id, reserve=sm.manifest.total_bytes, group=8)
        for i in order:
            w.submit(i, _aligned(pieces[i]))
        w.flush()
        w.close()
        assert 1 <= w.timers["writes"] <= len(pieces)  # consecutive queued pieces share one write call
        assert store.missing_pieces(sm.id) == []
        assert store.check(deep=True) == []
        assert all(store.read_piece(sm.id, i, verify=True) == p for i, p in enumerate(pieces))


def test_a_run_survives_short_writes_and_unaligned_pieces_fall_back(tmp_path, monkeypatch):
    """pwritev may write fewer bytes than asked; the run goes on from there (each short write here
    stops inside a piece, at a block boundary, as a real short O_DIRECT write does)."""
    data = [random.Random(n).randbytes(1 << 16) for n in range(4)]
    real = os.pwritev
    calls = []

    def short(fd, views, offset):
        calls.append(offset)
        budget = 3 * store_files.ALIGN  # at most three blocks per call
        cut, left = [], budget
        for v in views:
            if left <= 0:
                break
            cut.append(memoryview(v)[:left])
            left -= len(cut[-1])
        return real(fd, cut, offset)

    monkeypatch.setattr(store_files.os, "pwritev", short)
    files = DataFiles(tmp_path)
    mid = bytes(32)
    fd, direct_fd = files.open_for_write(mid)
    try:
        files.write_run(fd, direct_fd, 0, [_aligned(d) for d in data])  # aligned: pwritev, many short writes
        files.write_run(fd, direct_fd, 4 << 16, [data[0], data[1]])  # bytes: not aligned buffers, piece by piece
        os.fdatasync(fd)
    finally:
        files.close_fds(fd, direct_fd)
    assert files.read(mid, 0, 6 << 16) == b"".join(data) + data[0] + data[1]
    if direct_fd is not None:  # the filesystem took O_DIRECT: the aligned run went through pwritev
        assert len(calls) == -(-(4 << 16) // (3 * store_files.ALIGN))


def test_a_piece_of_the_wrong_size_is_refused_and_a_closed_writer_takes_nothing(tmp_path):
    sm, pieces = fake_artifact(71, 3)
    with Store(tmp_path) as store:
        store.put_manifest(sm.raw)
        w = store.group_writer(sm.id)
        with pytest.raises(Exception, match="do not fit the manifest"):
            w.submit(0, pieces[0][:-1])
        w.close()
        w.close()  # idempotent
        with pytest.raises(WriterClosedError):
            w.submit(0, pieces[0])
        assert store.missing_pieces(sm.id) == [0, 1, 2]


def test_a_manifest_removed_while_its_pieces_are_written_fails_the_writer(tmp_path):
    """The commit's foreign key refuses pieces of a removed artifact: the failure is reported once
    (on_failure), later submits raise, close() raises it, and nothing is marked."""
    sm, pieces = fake_artifact(72, 4)
    failures: list[Exception] = []
    with Store(tmp_path) as store:
        store.put_manifest(sm.raw)
        w = store.group_writer(sm.id, group=2, on_failure=failures.append)
        store.remove(sm.id)
        w.submit(0, pieces[0])
        w.submit(1, pieces[1])  # a full group: its commit fails
        with pytest.raises(NotFoundError, match="removed while its pieces were written"):
            w.close()
        assert len(failures) == 1 and isinstance(failures[0], NotFoundError)
        with pytest.raises(WriterClosedError):
            w.submit(2, pieces[2])
        assert store.db.execute("SELECT COUNT(*) FROM present").fetchone()[0] == 0


MB, GROUP = 12, 4
KILLER = r"""
import resource, signal, sys, threading
from pathlib import Path
from tests.artifacts import fake_artifact
from kvnet.store import Store
root, seed, die_after = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sm, pieces = fake_artifact(seed, 12)
with Store(root) as store:
    store.put_manifest(sm.raw)
    todo = store.missing_pieces(sm.id)
    committed, done = threading.Event(), []
    def on_commit(batch):
        done.extend(batch)
        if len(done) >= 4:  # the first 4 pieces may be committed in more than one group
            committed.set()
    w = store.group_writer(sm.id, group=4, on_commit=on_commit)
    print("start", len(todo), flush=True)
    if die_after >= 0:
        for i in todo[:4]:
            w.submit(i, pieces[i])
        w.flush()
        committed.wait(30)
        print("committed", flush=True)
        # any write that reaches past piece die_after + half a piece kills this process (no finally runs)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        limit = die_after * len(pieces[0]) + (1 << 19) + 4096
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        todo = todo[4:]
    for i in todo:
        w.submit(i, pieces[i])
    w.close()
print("done", flush=True)
"""


def _run(root: Path, seed: int, die_after: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", KILLER, str(root), str(seed), str(die_after)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_a_writer_killed_mid_write_leaves_only_durable_pieces_marked_and_resume_completes(tmp_path):
    root = tmp_path / "store"
    proc = _run(root, 73, die_after=6)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    assert proc.stdout.split() == ["start", str(MB), "committed"]
    # before anything reopens (and so recovers) the store:
    assert unsound_present_pieces(root) == []
    present = _present_in_index(root)
    assert set(range(GROUP)) <= present and max(present) < 6 + 1  # the committed group, nothing past the kill

    again = _run(root, 73, die_after=-1)  # resume: only the missing pieces are written
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == ["start", str(MB - len(present)), "done"]
    sm, pieces = fake_artifact(73, MB)
    with Store(root) as store:
        assert store.check(deep=True) == []
        assert store.missing_pieces(sm.id) == []
        assert all(store.read_piece(sm.id, i, verify=True) == p for i, p in enumerate(pieces))
    assert unsound_present_pieces(root) == []


def test_a_writer_makes_room_for_its_whole_fetch_first_or_refuses(tmp_path):
    """Capacity is made once, when the writer opens: an older unpinned artifact is evicted for the
    reserved bytes; with nothing evictable the open fails with StoreFullError and marks nothing."""
    from kvnet.store import StoreFullError

    old, old_pieces = fake_artifact(75, 3)
    new, _ = fake_artifact(76, 3)
    with Store(tmp_path, capacity_bytes=4 << 20) as store:
        store.put_manifest(old.raw)
        store.put_pieces(old.id, list(enumerate(old_pieces)))
        store.put_manifest(new.raw)
        store.pin(old.id)
        with pytest.raises(StoreFullError):
            store.group_writer(new.id, reserve=new.manifest.total_bytes)
        assert store.missing_pieces(old.id) == []  # pinned: kept
        store.pin(old.id, False)
        store.group_writer(new.id, reserve=new.manifest.total_bytes).close()
        assert old.id not in {e.id for e in store.entries()}  # evicted for the reservation
