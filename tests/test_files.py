"""Output paths: atomic writes, and outputs that cannot be written are refused before any work."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from persres.errors import OutputExistsError, OutputPathError
from persres.files import atomic_dir, atomic_path, check_writable, write_json


def test_a_folder_under_a_file_or_a_file_as_folder_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "photo.png"
    blocker.write_bytes(b"x")
    with pytest.raises(OutputPathError, match="photo.png is a file, not a folder"):
        check_writable(blocker / "deeper" / "out", "out")
    with pytest.raises(OutputPathError, match="`out` .*photo.png is a file; pass a folder"):
        check_writable(blocker, "out")
    check_writable(blocker, "out", folder=False)  # as a file path it is a place to write


def test_a_writable_path_passes_and_nothing_is_left_behind(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "nested" / "out", "out")
    assert list(tmp_path.iterdir()) == []  # nothing created, the probe file removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="cannot create a file in"):
            check_writable(locked / "out", "out")
    finally:
        locked.chmod(0o700)


def test_atomic_outputs_never_replace_a_folder_and_refuse_existing_files(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(OutputExistsError):
        write_json(tmp_path / "a.json", {"x": 2}, overwrite=False)
    assert (tmp_path / "a.json").read_text() == '{\n  "x": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "half").write_text("written")
        raise RuntimeError("killed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no partial folder left


def test_a_file_that_appears_while_writing_is_never_replaced(tmp_path: Path) -> None:
    """Two writers of one new output: the later one's check passed, but the first one's file stays."""
    target = tmp_path / "out.json"
    with pytest.raises(OutputExistsError, match=f"{target} already exists"):
        with atomic_path(target, overwrite=False) as tmp:
            tmp.write_text("second")
            target.write_text("first")  # another process finished meanwhile
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left


def test_a_folder_that_appears_while_writing_is_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    for made_meanwhile in ("an empty folder", "a full folder", "a file"):
        with pytest.raises(OutputExistsError, match=f"{target} already exists"):
            with atomic_dir(target) as tmp:
                (tmp / "model.safetensors").write_text("second")
                if made_meanwhile == "a file":
                    target.write_text("first")
                else:
                    target.mkdir()
                    if made_meanwhile == "a full folder":
                        (target / "model.safetensors").write_text("first")
        if made_meanwhile == "a file":
            assert target.read_text() == "first"
            target.unlink()
        else:
            kept = ["first"] if "full" in made_meanwhile else []
            assert [p.read_text() for p in target.iterdir()] == kept
            shutil.rmtree(target)
        assert list(tmp_path.iterdir()) == []  # no temporary left


def test_replacing_on_request_still_works(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": 1})
    write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    (tmp_path / "result").mkdir()
    (tmp_path / "result" / "old").write_text("old")
    with atomic_dir(tmp_path / "result", replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in (tmp_path / "result").iterdir()] == ["new"]
