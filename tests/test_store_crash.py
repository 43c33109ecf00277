"""A writer killed in the middle of writing a piece leaves no wrong bytes under pieces/.

The store's promise (kvnet/store.py) is that a file under pieces/ is always whole: pieces are written
to tmp/ and renamed into place. The SIGKILL tests in test_store.py used to reopen the store before
looking, and opening recovers (it deletes files whose hash is wrong), so a store that wrote pieces in
place passed them. Here the disk is inspected BEFORE anything reopens the store.

A SIGKILL at a random moment rarely lands inside a 1 MiB write (measured: the write is ~1-2% of a
piece's time, fsyncs take the rest), so these tests aim the kill instead: the writer lowers its own
file-size limit (RLIMIT_FSIZE) and restores SIGXFSZ's default action, so the kernel terminates it
inside the write of piece k after exactly CUT bytes. Like SIGKILL, no user-space code runs after that
(no except, no finally, no atexit). test_store.py keeps the random-moment SIGKILLs, now with the same
before-reopen check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvnet.hashing import b3
from kvnet.store import Store
from tests.artifacts import fake_artifact

ROOT = Path(__file__).resolve().parents[1]
MB = 8  # 8 pieces of 1 MiB
CUT = (1 << 19) + 1  # bytes of the piece written when the writer dies: half a piece and one odd byte

WRITER = r"""
import resource, signal, sys
from pathlib import Path
from tests.artifacts import fake_artifact
from kvnet.store import Store
root, seed, mb, die_in, cut = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sm, pieces = fake_artifact(seed, mb)
with Store(root) as store:
    store.put_manifest(sm.raw)
    for n, i in enumerate(store.missing_pieces(sm.id)):
        if n == die_in:  # from here on, a write past `cut` bytes of any file kills this process
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_FSIZE, (cut, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        store.put_piece(sm.id, i, pieces[i])
        print("piece", i, flush=True)
print("done", flush=True)
"""


def _write(root: Path, seed: int, die_in: int = -1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", WRITER, str(root), str(seed), str(MB), str(die_in), str(CUT)],
                          capture_output=True, text=True, env=env, timeout=120)


def torn_piece_files(root: Path) -> list[str]:
    """Files under pieces/ that are not named by the BLAKE3 of their bytes (in the dir of its first
    byte): what a reader that trusts the store's layout would be handed."""
    bad = []
    for path in sorted((root / "pieces").rglob("*")):
        if path.is_file() and (b3(path.read_bytes()).hex() != path.name or path.parent.name != path.name[:2]):
            bad.append(f"{path.relative_to(root)} ({path.stat().st_size} B)")
    return bad


def _files_of_size(root: Path, size: int) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size == size]


@pytest.mark.parametrize("die_in", [0, 5])
def test_writer_killed_inside_a_piece_write_leaves_only_whole_pieces(tmp_path, die_in):
    root = tmp_path / "store"
    proc = _write(root, seed=40 + die_in, die_in=die_in)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    assert proc.stdout.split() == [x for i in range(die_in) for x in ("piece", str(i))]
    assert _files_of_size(root, CUT), "the kill did not land inside a piece write"  # the torn write exists

    # before anything reopens (and so recovers) the store:
    assert torn_piece_files(root) == []
    assert len([p for p in (root / "pieces").rglob("*") if p.is_file()]) == die_in

    # the store opens clean, and a restarted writer completes the artifact
    assert _write(root, seed=40 + die_in).returncode == 0
    sm, pieces = fake_artifact(40 + die_in, MB)
    with Store(root) as store:
        assert store.check() == []
        assert store.missing_pieces(sm.id) == []
        assert all(store.read_piece(sm.id, i, verify=True) == p for i, p in enumerate(pieces))
    assert torn_piece_files(root) == []
    assert not list((root / "tmp").iterdir())


def test_the_torn_file_check_sees_a_torn_file(tmp_path):
    """The check above can fail: a truncated or misplaced piece file is reported."""
    sm, pieces = fake_artifact(41, 2)
    h = sm.manifest.pieces[0].hex()
    path = tmp_path / "pieces" / h[:2] / h
    path.parent.mkdir(parents=True)
    path.write_bytes(pieces[0])
    assert torn_piece_files(tmp_path) == []
    path.write_bytes(pieces[0][:CUT])
    assert torn_piece_files(tmp_path) == [f"pieces/{h[:2]}/{h} ({CUT} B)"]
    path.write_bytes(pieces[0])
    path.rename(tmp_path / "pieces" / h)  # right name, wrong directory
    assert torn_piece_files(tmp_path) == [f"pieces/{h} ({len(pieces[0])} B)"]
