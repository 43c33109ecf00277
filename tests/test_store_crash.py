"""A writer killed in the middle of a group leaves no piece marked present whose bytes are wrong, and
files changed behind the store's back (torn, truncated, removed) are found and corrected.

The store's promise (kvnet/store.py) is the durability rule: a group of pieces is written into the
artifact's data file, fdatasynced, and only then marked present in the index. So bytes of a group that
was cut short may sit in the data file, but the index never marks them. Opening a store recovers, and
would hide a store that marked pieces too early, so the kill tests inspect the disk and the index
BEFORE anything reopens the store (`unsound_present_pieces`).

A SIGKILL at a random moment rarely lands inside a write (fsyncs take most of the time), so these
tests aim the kill instead: the writer lowers its own file-size limit (RLIMIT_FSIZE) and restores
SIGXFSZ's default action, so the kernel terminates it inside group g's writes, after two whole pieces
of the group and CUT bytes of the third. Like SIGKILL, no user-space code runs after that (no except,
no finally, no atexit). tests/test_store.py keeps the random-moment SIGKILLs, with the same check.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from kvnet.hashing import b3
from kvnet.manifest import parse
from kvnet.store import NotFoundError, Store
from tests.artifacts import corrupt_piece, fake_artifact

ROOT = Path(__file__).resolve().parents[1]
MB = 12  # 12 pieces of 1 MiB
GROUP = 4  # pieces per put_pieces call: one fdatasync and one commit each
# Bytes of the third piece of the group written when the writer dies: half a piece and one odd byte for
# buffered writes; with O_DIRECT the cut must fall on a 4 KiB boundary (a write cut short at an odd
# length fails with EINVAL instead of being cut, and the process would not die inside it).
CUT = {"off": (1 << 19) + 1, "auto": (1 << 19) + 4096}

WRITER = r"""
import resource, signal, sys
from pathlib import Path
from tests.artifacts import fake_artifact
from kvnet.store import Store
root, seed, mb, group, die_in, cut, direct = sys.argv[1:]
root, seed, mb, group, die_in, cut = Path(root), int(seed), int(mb), int(group), int(die_in), int(cut)
sm, pieces = fake_artifact(seed, mb)
with Store(root, direct_io=None if direct == "auto" else False) as store:
    store.put_manifest(sm.raw)
    missing = store.missing_pieces(sm.id)
    print("start", len(missing), flush=True)
    for g in range(0, len(missing), group):
        todo = missing[g:g + group]
        if g // group == die_in:  # a write past 2 pieces + `cut` bytes of this group kills this process
            limit = (todo[0] + 2) * len(pieces[0]) + cut
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        store.put_pieces(sm.id, [(i, pieces[i]) for i in todo])
        print("group", g // group, flush=True)
print("done", flush=True)
"""


def _write(root: Path, seed: int, die_in: int = -1, direct: str = "auto") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", WRITER, str(root), str(seed), str(MB), str(GROUP), str(die_in),
                           str(CUT[direct]), direct], capture_output=True, text=True, env=env, timeout=120)


def unsound_present_pieces(root: Path) -> list[str]:
    """Pieces the index marks present whose bytes in the data file do not match the manifest's hash
    (or are missing): what a reader that trusts the index would be handed. Reads the SQLite file and
    the data files directly, without opening (and so recovering) the store."""
    uri = "file:" + urllib.parse.quote(str((root / "index.sqlite").resolve())) + "?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        rows = db.execute("SELECT p.manifest_id, p.idx, p.size, mp.hash FROM present p JOIN manifest_pieces mp "
                          "ON mp.manifest_id = p.manifest_id AND mp.idx = p.idx").fetchall()
    finally:
        db.close()
    bad = []
    for mid, idx, size, h in rows:
        piece_size = parse((root / "manifests" / f"{mid.hex()}.msgpack").read_bytes(),
                           allow_expired=True).manifest.piece_size
        path = root / "data" / f"{mid.hex()}.kv"
        data = b""
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(idx * piece_size)
                data = f.read(size)
        if len(data) != size or b3(data) != h:
            bad.append(f"{mid.hex()[:16]} piece {idx} ({len(data)} of {size} B)")
    return bad


def _present_in_index(root: Path) -> set[int]:
    db = sqlite3.connect("file:" + urllib.parse.quote(str((root / "index.sqlite").resolve())) + "?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT idx FROM present")}
    finally:
        db.close()


@pytest.mark.parametrize(("die_in", "direct"), [(0, "auto"), (1, "auto"), (1, "off"), (2, "off")])
def test_writer_killed_inside_a_group_leaves_only_durable_verified_pieces_marked(tmp_path, die_in, direct):
    root = tmp_path / "store"
    seed = 40 + die_in
    proc = _write(root, seed, die_in=die_in, direct=direct)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    assert proc.stdout.split() == ["start", str(MB), *[x for g in range(die_in) for x in ("group", str(g))]]
    sm, pieces = fake_artifact(seed, MB)
    size = (root / "data" / f"{sm.id.hex()}.kv").stat().st_size
    assert die_in * GROUP << 20 < size <= ((die_in * GROUP + 2) << 20) + CUT[direct]  # died inside group die_in

    # before anything reopens (and so recovers) the store:
    assert unsound_present_pieces(root) == []
    assert _present_in_index(root) == set(range(die_in * GROUP))  # the whole groups before, nothing of this one

    with Store(root) as store:  # the store opens clean; resume asks for exactly the rest
        assert store.check(deep=True) == []
        assert store.missing_pieces(sm.id) == list(range(die_in * GROUP, MB))
    again = _write(root, seed, direct=direct)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[:2] == ["start", str(MB - die_in * GROUP)]
    with Store(root) as store:
        assert store.check(deep=True) == []
        assert store.missing_pieces(sm.id) == []
        assert all(store.read_piece(sm.id, i, verify=True) == p for i, p in enumerate(pieces))
    assert unsound_present_pieces(root) == []
    assert not list((root / "tmp").iterdir())


def test_the_unsound_check_sees_a_wrong_marked_piece(tmp_path):
    """The check above can fail: a marked piece with a flipped byte, or cut off, is reported."""
    sm, pieces = fake_artifact(41, 3)
    with Store(tmp_path) as store:
        store.put_manifest(sm.raw)
        store.put_pieces(sm.id, list(enumerate(pieces)))
        assert unsound_present_pieces(tmp_path) == []
        corrupt_piece(store, sm.id, 1, at=12345)
    assert unsound_present_pieces(tmp_path) == [f"{sm.id.hex()[:16]} piece 1 ({1 << 20} of {1 << 20} B)"]
    os.truncate(tmp_path / "data" / f"{sm.id.hex()}.kv", (2 << 20) + 7)
    assert len(unsound_present_pieces(tmp_path)) == 2  # piece 1 still wrong, piece 2 cut to 7 bytes


def _stored(root: Path, seed: int, mb: int):
    sm, pieces = fake_artifact(seed, mb)
    with Store(root) as store:
        store.put_manifest(sm.raw)
        store.put_pieces(sm.id, list(enumerate(pieces)))
    return sm, pieces


def test_a_torn_write_inside_a_data_file_is_found_and_refetched(tmp_path):
    sm, pieces = _stored(tmp_path, 42, 3)
    with Store(tmp_path) as store:
        corrupt_piece(store, sm.id, 2, at=len(pieces[2]) - 1)
        assert store.check(deep=False) == []  # sizes are right: only hashing finds it
        assert store.check(deep=True) == [f"piece 2 of {sm.id.hex()[:16]}: bytes do not match their hash"]
        assert store.read_piece(sm.id, 2, verify=False) != pieces[2]  # no verify: the caller verifies (load_kv)
        with pytest.raises(Exception, match="corrupt; dropped"):
            store.read_piece(sm.id, 2, verify=True)
        assert store.missing_pieces(sm.id) == [2] and store.check(deep=True) == []
        assert store.put_piece(sm.id, 2, pieces[2])  # a fetch rewrites it in place
        assert store.read_piece(sm.id, 2, verify=True) == pieces[2] and store.check() == []


def test_a_truncated_data_file_drops_the_pieces_it_lost(tmp_path):
    sm, pieces = _stored(tmp_path, 43, 4)
    os.truncate(tmp_path / "data" / f"{sm.id.hex()}.kv", (2 << 20) + 100)  # pieces 0-1 whole, 2 cut, 3 gone
    with Store(tmp_path, read_only=True) as ro:  # a read-only open reports, and changes nothing
        assert len(ro.check(deep=False)) == 2
        with pytest.raises(NotFoundError, match="truncated"):
            ro.read_piece(sm.id, 3)
        assert ro.present_pieces(sm.id) == {0, 1, 2, 3}
    with Store(tmp_path) as store:  # a writable open recovers: the lost pieces are no longer marked
        assert store.missing_pieces(sm.id) == [2, 3]
        assert store.check(deep=True) == []
        store.put_pieces(sm.id, [(2, pieces[2]), (3, pieces[3])])
        assert all(store.read_piece(sm.id, i, verify=True) == p for i, p in enumerate(pieces))


def test_a_data_file_cut_while_open_is_corrected_on_read(tmp_path):
    sm, pieces = _stored(tmp_path, 44, 3)
    with Store(tmp_path) as store:
        os.truncate(store.piece_span(sm.id, 1)[0], 1 << 20)  # behind the open store's back
        assert store.read_piece(sm.id, 0, verify=True) == pieces[0]
        with pytest.raises(NotFoundError, match="truncated"):
            store.read_piece(sm.id, 2)
        assert store.missing_pieces(sm.id) == [1, 2]  # both pieces past the end are dropped at once
        assert store.check() == []


def test_a_removed_data_file_is_not_found_and_the_index_is_corrected(tmp_path):
    sm, pieces = _stored(tmp_path, 45, 3)
    with Store(tmp_path) as store:
        store.files.path(sm.id).unlink()
        assert store.check(deep=False) != []
        with pytest.raises(NotFoundError, match="removed"):
            store.read_piece(sm.id, 1)
        assert store.missing_pieces(sm.id) == [0, 1, 2] and store.check() == []
        with pytest.raises(NotFoundError):
            store.piece_span(sm.id, 0)
        store.put_pieces(sm.id, list(enumerate(pieces)))  # a fetch recreates it
        assert store.check() == [] and store.read_piece(sm.id, 1, verify=True) == pieces[1]
    other, _ = _stored(tmp_path, 46, 1)
    (tmp_path / "data" / f"{other.id.hex()}.kv").unlink()
    with Store(tmp_path) as store:  # found on open too
        assert store.missing_pieces(other.id) == [0] and store.recover()["pieces_dropped"] == 0


def test_leftovers_of_a_crash_are_cleaned_on_open(tmp_path):
    """A data file whose manifest was removed (a crash between the index change and the unlink), a
    manifest file renamed but never indexed, and a dead process's tmp file."""
    sm, pieces = _stored(tmp_path, 47, 1)
    orphan = tmp_path / "data" / ("ab" * 32 + ".kv")
    orphan.write_bytes(b"left behind")
    unindexed, _ = fake_artifact(48, 1)
    (tmp_path / "manifests" / f"{unindexed.id.hex()}.msgpack").write_bytes(unindexed.raw)
    (tmp_path / "tmp" / "999999999-dead").write_bytes(b"half")
    with Store(tmp_path) as store:
        assert not orphan.exists() and not list((tmp_path / "tmp").iterdir())
        assert {e.id for e in store.entries()} == {sm.id, unindexed.id}
        assert store.missing_pieces(unindexed.id) == [0] and store.missing_pieces(sm.id) == []
        assert store.check() == []
