"""The local store: crash safety with real SIGKILLs, resume, LRU eviction, pins, capacity, readers,
and a real full disk."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kvnet import identity
from kvnet.artifact import ArtifactError
from kvnet.store import NotFoundError, Store, StoreFullError
from tests.artifacts import corrupt_piece, fake_artifact
from tests.test_store_crash import unsound_present_pieces

WRITER = r"""
import sys
from pathlib import Path
from tests.artifacts import corrupt_piece, fake_artifact
from kvnet.store import Store
root, seed, mb = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sm, pieces = fake_artifact(seed, mb)
with Store(root) as store:
    store.put_manifest(sm.raw)
    missing = store.missing_pieces(sm.id)
    print("start", len(missing), flush=True)
    for i in missing:
        store.put_piece(sm.id, i, pieces[i])
        print("piece", i, flush=True)
print("done", flush=True)
"""

def _writer(root: Path, seed: int, mb: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(seed), str(mb)],
                            stdout=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("kill_after", [1, 7, 19])
def test_sigkill_mid_write_then_restart_and_resume(tmp_path, kill_after):
    root = tmp_path / "store"
    proc = _writer(root, seed=1, mb=32)
    done = 0
    for line in proc.stdout:
        if line.startswith("piece"):
            done += 1
            if done == kill_after:
                time.sleep(random.Random(kill_after).random() * 0.02)  # land inside a later write
                os.kill(proc.pid, signal.SIGKILL)
                break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert unsound_present_pieces(root) == []  # before reopening: opening recovers, and would hide it

    sm, pieces = fake_artifact(1, 32)
    with Store(root) as store:  # opening recovers
        assert store.check() == []
        assert not list((root / "tmp").iterdir())
        present = store.present_pieces(sm.id)
        assert kill_after <= len(present) < len(pieces)
        for i in present:  # whatever the index serves is the right bytes
            assert store.read_piece(sm.id, i, verify=True) == pieces[i]
        missing = store.missing_pieces(sm.id)
        assert sorted(present | set(missing)) == list(range(len(pieces)))

    # a restarted writer resumes: it writes only what was missing
    proc = _writer(root, seed=1, mb=32)
    lines = proc.stdout.read().splitlines()
    assert proc.wait() == 0
    assert lines[0] == f"start {len(missing)}"
    with Store(root) as store:
        assert store.missing_pieces(sm.id) == []
        assert store.check() == []


def test_corrupt_file_on_disk_is_caught_by_verify_on_read(tmp_path):
    sm, pieces = fake_artifact(3, 2)
    with Store(tmp_path, verify_on_read=True) as store:
        store.put_manifest(sm.raw)
        for i, p in enumerate(pieces):
            store.put_piece(sm.id, i, p)
        corrupt_piece(store, sm.id, 1, at=5)
        assert store.check() != []
        with pytest.raises(ArtifactError, match="corrupt"):
            store.read_piece(sm.id, 1)
        assert store.missing_pieces(sm.id) == [1]  # dropped, so a fetch will replace it
        assert store.check() == []


def _fill(store, seed, mb=1):
    sm, pieces = fake_artifact(seed, mb)
    store.put_manifest(sm.raw)
    for i, p in enumerate(pieces):
        store.put_piece(sm.id, i, p)
    return sm.id


def test_lru_eviction_never_removes_pinned(tmp_path):
    with Store(tmp_path, capacity_bytes=3 << 20) as store:
        a = _fill(store, 10)
        store.pin(a)
        b = _fill(store, 11)
        c = _fill(store, 12)
        store.touch(b)  # b is now more recent than c
        d = _fill(store, 13)  # needs room: evicts c (LRU unpinned), never a
        ids = {e.id for e in store.entries()}
        assert ids == {a, b, d} and c not in ids
        assert not store.files.path(c).exists()  # eviction frees the data file
        assert store.usage() <= 3 << 20
        e = _fill(store, 14)
        assert {x.id for x in store.entries()} == {a, d, e}
        store.pin(d)
        store.pin(e)
        sm, pieces = fake_artifact(15, 1)
        store.put_manifest(sm.raw)
        with pytest.raises(StoreFullError, match="nothing unpinned"):
            store.put_piece(sm.id, 0, pieces[0])
        assert store.check() == []  # a refused write loses nothing
        assert {x.id for x in store.entries() if x.complete} == {a, d, e}


def test_two_manifests_of_the_same_bytes_each_hold_their_own_copy(tmp_path):
    """No content addressing across artifacts (docs/artifact.md): a piece stored for one manifest is
    not present for another with the same hash; each artifact's data file holds its own bytes, so
    removing one keeps the other whole."""
    sm, pieces = fake_artifact(4, 1)
    other = Ed25519PrivateKey.generate()
    import dataclasses
    sm2 = dataclasses.replace(sm.manifest, publisher=identity.public_bytes(other)).sign(other)
    with Store(tmp_path) as store:
        store.put_manifest(sm.raw)
        store.put_manifest(sm2.raw)
        store.put_piece(sm.id, 0, pieces[0])
        assert store.has_piece(sm.manifest.pieces[0])
        assert store.missing_pieces(sm2.id) == [0]
        store.put_piece(sm2.id, 0, pieces[0])
        store.remove(sm.id)
        assert store.read_piece(sm2.id, 0, verify=True) == pieces[0]
        assert store.usage() == len(pieces[0])
        assert store.db.execute("PRAGMA user_version").fetchone() == (2,)  # a new store is in the new layout
        with pytest.raises(NotFoundError):
            store.get_manifest(sm.id)


def test_piece_span_locates_the_bytes_for_a_zero_copy_sender(tmp_path):
    sm, pieces = fake_artifact(9, 3)
    with Store(tmp_path) as store:
        store.put_manifest(sm.raw)
        store.put_pieces(sm.id, [(0, pieces[0]), (2, pieces[2])])
        path, offset, size = store.piece_span(sm.id, 2)
        assert (offset, size) == (2 * sm.manifest.piece_size, len(pieces[2]))
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, size, offset) == pieces[2]
        finally:
            os.close(fd)
        with pytest.raises(NotFoundError):
            store.piece_span(sm.id, 1)  # not present: no span, even though the file has a hole there


def test_put_pieces_marks_only_verified_pieces_and_skips_present_ones(tmp_path):
    sm, pieces = fake_artifact(8, 3)
    with Store(tmp_path) as store:
        store.put_manifest(sm.raw)
        bad = bytearray(pieces[1])
        bad[0] ^= 1
        stored, errors = store.put_pieces(sm.id, [(0, pieces[0]), (1, bad), (2, pieces[2][:-1])])
        assert stored == [0] and set(errors) == {1, 2}
        stored, errors = store.put_pieces(sm.id, [(0, pieces[0]), (2, pieces[2][:-1])], verified=True)
        assert stored == [] and set(errors) == {2}  # verified=True still refuses a piece of the wrong size
        assert store.put_pieces(sm.id, [(1, pieces[1]), (2, pieces[2])], verified=True) == ([1, 2], {})
        assert store.usage() == sum(map(len, pieces)) and store.check() == []
        data = store.read_piece(sm.id, 2)
        assert isinstance(data, bytearray) and data == pieces[2]


READER = r"""
import sys
from pathlib import Path
from tests.artifacts import corrupt_piece, fake_artifact
from kvnet.store import Store
sm, pieces = fake_artifact(5, 4)
with Store(Path(sys.argv[1]), verify_on_read=True) as store:
    for _ in range(5):
        for i in range(len(pieces)):
            assert store.read_piece(sm.id, i) == pieces[i]
print("ok")
"""


def test_several_reader_processes_while_a_writer_writes(tmp_path):
    with Store(tmp_path) as store:
        _fill(store, 5, 4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(tmp_path)], stdout=subprocess.PIPE,
                                text=True, env=env) for _ in range(3)]
    writers = [_writer(tmp_path, seed=6, mb=8), _writer(tmp_path, seed=16, mb=8)]  # two writers at once
    assert [w.wait() for w in writers] == [0, 0]
    for r in readers:
        assert r.communicate()[0].strip() == "ok"
    with Store(tmp_path) as store:
        assert store.check() == []
        assert all(e.complete for e in store.entries())


class FullDiskNotRunWarning(UserWarning):
    """The full-disk test could not get a real small filesystem on this machine and did not run."""


FULL_DISK = r"""
import sys
from pathlib import Path
from kvnet.store import Store, StoreFullError
from tests.artifacts import corrupt_piece, fake_artifact
disk = Path(sys.argv[1])
sm, pieces = fake_artifact(7, 6)  # 6 MiB of pieces for a 4 MiB disk
written = []
with Store(disk / "store") as store:
    store.put_manifest(sm.raw)
    try:
        for i, p in enumerate(pieces):
            store.put_piece(sm.id, i, p)
            written.append(i)
        raise AssertionError("6 MiB fit on a 4 MiB disk: the disk is not the small tmpfs")
    except StoreFullError as exc:
        assert "disk full" in str(exc), exc
    assert written and len(written) < len(pieces), written
    assert not list((disk / "store" / "tmp").iterdir())
with Store(disk / "store") as store:  # reopen: everything written before is intact
    assert store.check() == []
    assert sorted(store.present_pieces(sm.id)) == written
    assert all(store.read_piece(sm.id, i, verify=True) == pieces[i] for i in written)
print("ok", len(written), flush=True)
"""

# In a private mount namespace the tmpfs is invisible to everyone else and disappears with the process
# (no umount, nothing left mounted if the test dies). Root needs only the mount namespace; anyone else
# can get one inside a user namespace where they map to root.
_MOUNT_AND_RUN = 'mount -t tmpfs -o size=4m tmpfs "$1" && shift && exec "$@"'


def _namespace_prefixes() -> list[list[str]]:
    userns = ["unshare", "--user", "--map-root-user", "--mount"]
    return [["unshare", "--mount"], userns] if os.geteuid() == 0 else [userns]


def _private_small_disk(mnt: Path) -> tuple[list[str] | None, str]:
    """A command prefix that runs a command with a fresh 4 MiB tmpfs on `mnt`, or why there is none."""
    if shutil.which("unshare") is None:
        return None, "util-linux `unshare` is not installed (needed for a private 4 MiB tmpfs)"
    why = []
    for prefix in _namespace_prefixes():
        cmd = [*prefix, "sh", "-c", _MOUNT_AND_RUN, "sh", str(mnt)]
        probe = subprocess.run([*cmd, "true"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return cmd, ""
        why.append(f"`{' '.join(prefix)}` + mount tmpfs: {probe.stderr.strip() or probe.returncode}")
    return None, "cannot mount a private 4 MiB tmpfs: " + "; ".join(why)


def test_full_disk_gives_a_clear_error_and_loses_nothing(tmp_path):
    """A real 4 MiB filesystem (tmpfs), so a full disk is a real ENOSPC, not a mock."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    prefix, why = _private_small_disk(mnt)
    if prefix is None:
        warnings.warn(FullDiskNotRunWarning(f"full-disk test NOT RUN: {why}"), stacklevel=1)
        pytest.skip(f"full-disk test NOT RUN: {why}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([*prefix, sys.executable, "-c", FULL_DISK, str(mnt)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "ok"
    assert int(proc.stdout.split()[1]) >= 1
    assert not list(mnt.iterdir())  # the tmpfs was private: nothing was written to the real directory


def _old_layout_store(root: Path) -> dict:
    """A store written by the previous store code (tests/store_v1.py, layout pieces/<ab>/<hash>): a
    complete artifact, a second manifest sharing its piece files, a partial one, and one whose second
    piece file rotted on disk."""
    import dataclasses

    from tests import store_v1

    a, a_pieces = fake_artifact(20, 3)
    other = Ed25519PrivateKey.generate()
    b = dataclasses.replace(a.manifest, publisher=identity.public_bytes(other)).sign(other)
    c, c_pieces = fake_artifact(21, 2)
    d, d_pieces = fake_artifact(22, 2)
    with store_v1.Store(root) as old:
        for sm in (a, b, c, d):
            old.put_manifest(sm.raw)
        old.put_pieces(a.id, list(enumerate(a_pieces)))
        old.put_pieces(c.id, [(0, c_pieces[0])])
        old.put_pieces(d.id, list(enumerate(d_pieces)))
    h = d.manifest.pieces[1].hex()
    rotten = root / "pieces" / h[:2] / h
    rotten.write_bytes(b"\0" * len(d_pieces[1]))
    return {"pieces": {a.id: a_pieces, b.id: a_pieces, c.id: c_pieces, d.id: d_pieces},
            "present": {a.id: {0, 1, 2}, b.id: {0, 1, 2}, c.id: {0}, d.id: {0}}, "rotten": (d.id, 1)}


def test_an_old_layout_store_is_read_in_place_by_a_read_only_open(tmp_path):
    old = _old_layout_store(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.name.endswith(("-wal", "-shm")))
    with Store(tmp_path, read_only=True) as ro:
        assert {e.id for e in ro.entries()} == set(old["pieces"])
        for mid, pieces in old["pieces"].items():
            want = old["present"][mid] | ({1} if mid == old["rotten"][0] else set())  # not verified yet
            assert ro.present_pieces(mid) == want
            for i in old["present"][mid]:
                assert ro.read_piece(mid, i, verify=True) == pieces[i]
        with pytest.raises(ArtifactError, match="corrupt"):
            ro.read_piece(*old["rotten"], verify=True)
        assert len(ro.check(deep=True)) == 1
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.name.endswith(("-wal", "-shm")))
    assert after == before  # nothing converted, nothing created


def test_an_old_layout_store_is_converted_on_its_first_writable_open(tmp_path):
    old = _old_layout_store(tmp_path)
    with Store(tmp_path) as store:
        assert not (tmp_path / "pieces").exists()
        assert store.db.execute("SELECT 1 FROM sqlite_master WHERE name='pieces'").fetchone() is None
        assert store.db.execute("PRAGMA user_version").fetchone() == (2,)
        for mid, pieces in old["pieces"].items():
            assert store.present_pieces(mid) == old["present"][mid]  # the rotten piece was not moved
            assert all(store.read_piece(mid, i, verify=True) == pieces[i] for i in old["present"][mid])
        assert store.check(deep=True) == []
        assert store.usage() == sum(len(old["pieces"][m][i]) for m in old["pieces"] for i in old["present"][m])
        assert store.recover()["pieces_migrated"] == 0  # once only


MIGRATE_AND_DIE = r"""
import resource, signal, sys
from pathlib import Path
from kvnet.store import Store
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, ((1 << 20) + (1 << 19), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
Store(Path(sys.argv[1]))
"""


def test_a_migration_killed_midway_resumes_on_the_next_open(tmp_path):
    old = _old_layout_store(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", MIGRATE_AND_DIE, str(tmp_path)], env=env, timeout=60)
    assert proc.returncode == -signal.SIGXFSZ  # killed writing a data file past 1.5 MiB
    assert (tmp_path / "pieces").is_dir() and list((tmp_path / "data").iterdir())  # halfway
    with Store(tmp_path) as store:
        assert not (tmp_path / "pieces").exists()
        for mid, pieces in old["pieces"].items():
            assert store.present_pieces(mid) == old["present"][mid]
            assert all(store.read_piece(mid, i, verify=True) == pieces[i] for i in old["present"][mid])
        assert store.check(deep=True) == []


def test_pieces_from_page_aligned_buffers_are_written_without_a_copy_and_read_back(tmp_path):
    """A receiver reading into reused aligned buffers (mmap) hands them over as they are; O_DIRECT
    writes straight from them where the filesystem allows, plain pwrite elsewhere: same bytes back."""
    import mmap

    sm, pieces = fake_artifact(23, 3)
    bufs = [mmap.mmap(-1, 1 << 20) for _ in pieces]
    views = []
    for buf, p in zip(bufs, pieces, strict=True):
        buf[:len(p)] = p
        views.append(memoryview(buf)[:len(p)])
    for direct in (None, False):
        with Store(tmp_path / str(direct), direct_io=direct) as store:
            store.put_manifest(sm.raw)
            assert store.put_pieces(sm.id, list(enumerate(views)), verified=True)[0] == [0, 1, 2]
            assert [store.read_piece(sm.id, i, verify=True) for i in range(3)] == pieces
    for v in views:
        v.release()
    for buf in bufs:
        buf.close()  # nothing kept a reference to the caller's buffers
