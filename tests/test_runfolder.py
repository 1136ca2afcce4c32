"""The run folder: only what persres' marker lists is ever removed; the lock admits one train."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import pytest

from persres.errors import OutputExistsError, RunLockedError
from persres.runfolder import LOCK, MARKER, RUN_NAMES, RunFolder, find_run, release_lock, take_lock


def marked_run(out: Path, files: object) -> Path:
    out.mkdir(parents=True)
    (out / MARKER).write_text(json.dumps({"persres_version": "0.1.0", "created": "now", "files": files}))
    return out


def test_overwrite_removes_only_run_names_the_marker_lists(tmp_path: Path) -> None:
    out = marked_run(tmp_path / "run", ["config.json", "checkpoints", "notes.txt", "../outside", "/etc"])
    (out / "config.json").write_text("{}")
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (tmp_path / "outside").write_text("mine too")
    folder = RunFolder.check(out, str(tmp_path / "photos"), resume=False, overwrite=True)
    folder.claim()
    folder.release()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", MARKER]
    assert (tmp_path / "outside").read_text() == "mine too"
    assert json.loads((out / MARKER).read_text())["files"] == list(RUN_NAMES)


@pytest.mark.parametrize(
    ("files", "refused"),
    [
        (["config.json"], "persres did not write: checkpoints"),  # present, but not listed by the marker
        ("config.json", "is not a persres run marker"),
    ],
)
def test_a_run_name_the_marker_does_not_cover_is_refused(tmp_path: Path, files: object, refused: str) -> None:
    out = marked_run(tmp_path / "run", files)
    (out / "config.json").write_text("{}")
    (out / "checkpoints").mkdir()
    with pytest.raises(OutputExistsError, match=refused):
        find_run(out)


def test_a_linked_run_name_is_not_persres_own(tmp_path: Path) -> None:
    out = marked_run(tmp_path / "run", list(RUN_NAMES))
    (tmp_path / "elsewhere").mkdir()
    (out / "checkpoints").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputExistsError, match="persres did not write: checkpoints"):
        find_run(out)


def test_a_users_logs_folder_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    with pytest.raises(OutputExistsError, match="persres did not write: logs"):
        find_run(tmp_path)
    (tmp_path / "logs").rmdir()
    (tmp_path / "notes.txt").write_text("mine")
    assert find_run(tmp_path) is None  # other files are no run and no obstacle


def test_one_lock_at_a_time_and_only_the_holder_releases_it(tmp_path: Path) -> None:
    mine = take_lock(tmp_path / LOCK)
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        take_lock(tmp_path / LOCK)
    release_lock(tmp_path / LOCK, {**mine, "started": "another run"})
    assert (tmp_path / LOCK).exists()
    release_lock(tmp_path / LOCK, mine)
    assert not (tmp_path / LOCK).exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path: Path) -> None:
    lock = {"pid": 2**22 + 12345, "host": "not-" + socket.gethostname(), "started": "then"}  # pid not here
    (tmp_path / LOCK).write_text(json.dumps(lock))
    with pytest.raises(RunLockedError, match=f"if that process is gone, remove {tmp_path / LOCK}"):
        take_lock(tmp_path / LOCK)


def test_an_unreadable_lock_blocks_only_for_a_while(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / LOCK).write_text("")  # a process killed between creating and writing it
    with pytest.raises(RunLockedError, match="being locked by another process"):
        take_lock(tmp_path / LOCK)
    os.utime(tmp_path / LOCK, (0, 0))
    with caplog.at_level(logging.WARNING, logger="persres"):
        mine = take_lock(tmp_path / LOCK)
    assert "taking over the stale lock" in caplog.text
    assert json.loads((tmp_path / LOCK).read_text()) == mine


def test_a_claim_refused_by_the_lock_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    folder = RunFolder.check(out, str(tmp_path / "photos"), resume=False, overwrite=False)
    out.mkdir()
    holder = take_lock(out / LOCK)  # another train came first
    with pytest.raises(RunLockedError):
        folder.claim()
    folder.release()
    assert sorted(p.name for p in out.iterdir()) == [LOCK]
    release_lock(out / LOCK, holder)
    fresh = RunFolder.check(tmp_path / "new", str(tmp_path / "photos"), resume=False, overwrite=False)
    fresh.claim()
    assert sorted(p.name for p in fresh.path.iterdir()) == [LOCK, MARKER]
    fresh.release()
    assert sorted(p.name for p in fresh.path.iterdir()) == [MARKER]
