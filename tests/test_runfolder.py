"""The run folder: only what persres' marker lists is ever removed; the lock admits one train."""

from __future__ import annotations

import ast
import json
import logging
import os
import socket
from pathlib import Path

import pytest

import persres
from persres.errors import OutputExistsError, RunLockedError
from persres.formats.runfolder import LOCK, MARKER, RUN_NAMES, RunFolder, find_run, release_lock, take_lock


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
    assert json.loads((out / MARKER).read_text())["files"] == []  # this run has written nothing yet


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


def previous_marker_run(out: Path, method: str = "residuals") -> Path:
    """A run as the previous version left it: its marker claims every name a run may write."""
    marked_run(out, list(RUN_NAMES))
    (out / "config.json").write_text(json.dumps({"method": method}))
    (out / "residuals.safetensors").write_text("factors")
    for folder in ("checkpoints/step-000002", "validation/step-000002", "logs"):
        (out / folder).mkdir(parents=True)
    (out / "checkpoints" / ".step-000004.tmp").mkdir()  # a killed checkpoint write
    (out / "logs" / "loss.csv").write_text("step,loss\n")
    return out


def overwrite(out: Path, photos: Path) -> None:
    folder = RunFolder.check(out, str(photos), resume=False, overwrite=True)
    folder.claim()
    folder.release()


def test_overwrite_never_removes_what_the_run_did_not_write(tmp_path: Path) -> None:
    """A result/ beside a residuals run, or a user's photo in validation/: refused by name, kept."""
    out = previous_marker_run(tmp_path / "run")
    (out / "result").mkdir()
    (out / "result" / "keep.txt").write_text("mine")  # a residuals run never writes result/
    with pytest.raises(OutputExistsError, match="persres did not write: result; choose another folder"):
        overwrite(out, tmp_path / "photos")
    assert (out / "result" / "keep.txt").read_text() == "mine"
    (out / "result" / "keep.txt").unlink()
    (out / "result").rmdir()
    (out / "validation" / "my-photo.png").write_bytes(b"png")
    (out / "logs" / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(OutputExistsError, match="among its run's: logs/notes.txt, validation/my-photo.png;"):
        overwrite(out, tmp_path / "photos")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    (out / "validation" / "my-photo.png").unlink()
    (out / "logs" / "notes.txt").unlink()
    overwrite(out, tmp_path / "photos")
    assert sorted(p.name for p in out.iterdir()) == [MARKER]  # the previous run's files, and only those


def test_a_previous_peer_method_run_owns_its_result(tmp_path: Path) -> None:
    out = previous_marker_run(tmp_path / "run", method="lora")
    (out / "result").mkdir()
    (out / "result" / "pytorch_lora_weights.safetensors").write_text("weights")
    overwrite(out, tmp_path / "photos")
    assert sorted(p.name for p in out.iterdir()) == [MARKER]


def test_the_marker_lists_what_the_run_wrote_before_it_exists(tmp_path: Path) -> None:
    out = tmp_path / "run"
    folder = RunFolder.check(out, str(tmp_path / "photos"), resume=False, overwrite=False)
    folder.record(out / "config.json")  # before the claim: not this process's folder yet
    folder.claim()
    folder.record(out / "config.json", out / "validation" / "step-000002")
    folder.record(out / "config.json")
    marker = json.loads((out / MARKER).read_text())
    assert marker["files"] == ["config.json", "validation/step-000002"]
    (out / "config.json").write_text("{}")
    (out / "validation" / "step-000002").mkdir(parents=True)
    (out / "validation" / "mine.png").write_bytes(b"png")
    folder.release()
    with pytest.raises(OutputExistsError, match="validation/mine.png"):
        overwrite(out, tmp_path / "photos")
    (out / "validation" / "mine.png").unlink()
    (out / "validation" / ".step-000004.abc.tmp").mkdir()  # a validation write killed half-way
    overwrite(out, tmp_path / "photos")
    assert sorted(p.name for p in out.iterdir()) == [MARKER]


def test_a_link_among_the_written_names_is_not_followed(tmp_path: Path) -> None:
    out = previous_marker_run(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
    (out / "validation" / "step-000004").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputExistsError, match="validation/step-000004"):
        overwrite(out, tmp_path / "photos")
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine"


RUN_FOLDER_LITERALS = {
    *("logs", "loss.csv", "loss.png", "validation", "checkpoints", "samples", "result", "config.json"),
    *("residuals.safetensors", "persres-run.json", "app-request.json"),
}
NOT_A_RUN_FOLDER = {  # (module, literal): the same word, not a name in a run folder
    ("toyworld/train_base.py", "config.json"),  # the toy base's settings, in its own work folder
    ("toyworld/train_flux_base.py", "config.json"),  # the toy Flux base's, in its own work folder
    ("cli/training.py", "result"),  # "result: PATH", the label of the line train prints
}


def code_strings(tree: ast.Module) -> list[ast.Constant]:
    """The string constants of a module that are code: not docstrings, and not an argparse ``help=``."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    helps = {id(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call) for k in node.keywords
             if k.arg in ("help", "metavar")}  # fmt: skip
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings | helps]  # fmt: skip


def test_only_the_run_folder_module_names_a_run_folders_files() -> None:
    """Issue 20: one owner for the run folder; every other module imports the names from it."""
    package = Path(persres.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if name == "formats/runfolder.py":
            continue
        for node in code_strings(ast.parse(path.read_text(encoding="utf-8"))):
            if node.value in RUN_FOLDER_LITERALS and (name, node.value) not in NOT_A_RUN_FOLDER:
                found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not found, "use persres.formats.runfolder's names: " + "; ".join(found)
