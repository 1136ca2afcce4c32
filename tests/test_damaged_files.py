"""Every file persres reads, damaged in every generic way (``damage.py``), through every command that
reads it.

A damaged case exits 2 with one line on stderr that names the file, prints no traceback and writes
nothing: the workspace is byte for byte as before and the command's output is not created. A damage
that is harmless for a command (``BENIGN``: a field it does not read, a file it does not read) must
instead give exactly what the undamaged file gives: exit 0, the same output and the same files.
Each (file, command) first runs on the undamaged file, which must succeed, so that every refusal is
the damage's.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from damage import csv_damages, json_damages, metadata_damages, safetensors_damages, split_safetensors
from helpers import bench_argv, finished_benchmark, make_dataset, train_argv

from persres.cli import main

SAMPLE = ["--steps", "1", "--height", "16", "--width", "16", "--device", "cpu"]
RESIDUALS = "run/residuals.safetensors"
CHECKPOINT = "run/checkpoints/step-000002"


@dataclass(frozen=True)
class Workspace:
    """A copy of the sources (trained runs, a sample, a benchmark folder) in ``root``; the models and
    photos are shared and only read. ``out`` is where a command writes, and must not appear when it
    refuses."""

    root: Path
    base: Path
    photos: Path
    scorers: tuple[str, str]

    @property
    def out(self) -> Path:
        return self.root / "out"


Command = Callable[[Workspace], list[str]]


def resume(folder: str, flag: str = "--resume") -> Command:
    return lambda w: train_argv(
        w.base, w.photos, w.root / folder, "--steps", "3", "--checkpoint-every", "1", flag
    )


def using(source: str) -> dict[str, Command]:
    """The commands that read a residual file (or a run folder's): sample, merge, export, info."""
    return {
        "sample": lambda w: ["sample", "--base", str(w.base), "--residuals", str(w.root / source),
                             "--prompt", "a photo of a V* dog", "--out", str(w.out), *SAMPLE],
        "merge": lambda w: ["merge", "--base", str(w.base), "--residuals", str(w.root / source), "--out",
                            str(w.out)],
        "export": lambda w: ["export", str(w.root / source), "--format", "kohya", "--out",
                             str(w.out.with_suffix(".safetensors"))],
        "info": lambda w: ["info", str(w.root / source)],
    }  # fmt: skip


def report(w: Workspace) -> list[str]:
    return ["report", str(w.root / "bench"), "--out", str(w.out)]


def benchmark(concept: str) -> Command:
    """A rerun of the benchmark: pet_dog is finished (nothing to train), toy_cup is not."""
    return lambda w: [
        *bench_argv(w.root / "dataset", w.base, w.root / "bench", w.scorers),
        "--concept",
        concept,
    ]


def evaluate(w: Workspace) -> list[str]:
    return ["evaluate", "--images", str(w.root / "samples"), "--references", str(w.photos), "--clip",
            w.scorers[0], "--dino", w.scorers[1], "--device", "cpu", "--out", str(w.out)]  # fmt: skip


def residual_damages(good: bytes) -> dict[str, bytes]:
    """The generic safetensors damages, and each metadata field persres reads damaged on its own."""
    objects = ("architecture", "rank_config", "train_config")
    return {**safetensors_damages(good), **metadata_damages(good, ("format_version", "step"), objects)}


def lock_damages(good: bytes) -> dict[str, bytes]:
    """The generic JSON damages, and a pid no process can have."""
    return {**json_damages(good), "pid too large": json.dumps({**json.loads(good), "pid": 2**40}).encode()}


@dataclass(frozen=True)
class Reader:
    """A file persres reads (``path`` in the workspace), its damages and the commands that read it."""

    path: str
    damages: Callable[[bytes], dict[str, bytes]]
    commands: dict[str, Command]


RESUME = {"train --resume": resume("run")}
FRESH = {"train --resume": resume("fresh")}  # the run without checkpoints: resumes from step 0
TRAIN = {**RESUME, "train --overwrite": resume("run", "--overwrite")}
READERS = {
    "residual file": Reader(RESIDUALS, residual_damages, using(RESIDUALS)),
    "config.json": Reader(
        "run/config.json",
        json_damages,
        {**{k: v for k, v in using("run").items() if k != "merge"}, **RESUME},  # merge reads only the file
    ),
    "config.json, no checkpoint": Reader("fresh/config.json", json_damages, FRESH),
    "state.json": Reader(f"{CHECKPOINT}/state.json", json_damages, RESUME),
    "optimizer": Reader(f"{CHECKPOINT}/optimizer.safetensors", safetensors_damages, RESUME),
    "rng": Reader(f"{CHECKPOINT}/rng-0.safetensors", safetensors_damages, RESUME),
    "checkpoint residuals": Reader(f"{CHECKPOINT}/residuals.safetensors", safetensors_damages, RESUME),
    "loss.csv": Reader("run/logs/loss.csv", csv_damages, RESUME),
    "lock": Reader("run/.persres.lock", lock_damages, TRAIN),
    "run marker": Reader("run/persres-run.json", json_damages, TRAIN),
    "results.csv": Reader("bench/results.csv", csv_damages, {"report": report}),
    "result.json": Reader(
        "bench/runs/pet_dog/rank-0.05/result.json",
        json_damages,
        {"report": report, "benchmark": benchmark("toy_cup")},
    ),
    "benchmark.json": Reader("bench/benchmark.json", json_damages, {"benchmark": benchmark("pet_dog")}),
    "sidecar": Reader("samples/0000-a-photo-of-a-v-dog-normal.json", json_damages, {"evaluate": evaluate}),
}  # fmt: skip

# (file, command, damage or "*" for all) -> why it is harmless there; the case must equal the undamaged one
BENIGN: dict[tuple[str, str, str], str] = {
    ("config.json", "info", "*"): "info reads the residual file's header only, never config.json",
    ("config.json", "train --resume", "*"): "a resumed run takes its settings from the checkpoint's "
    "state.json (checked) and writes config.json anew",
    **{
        (name, command, "missing keys"): "the setting left out (adam_weight_decay) takes its default, as in "
        "a config.json written before the setting existed"
        for name, command in (
            ("config.json", "sample"),
            ("config.json", "export"),
            ("config.json, no checkpoint", "train --resume"),
        )
    },  # fmt: skip
    **{
        ("run marker", command, "missing keys"): "the marker's creation time is a record for people"
        for command in TRAIN
    },
    ("sidecar", "evaluate", "missing keys"): "evaluate reads a sidecar's prompt, token and concepts, not "
    "its base model",
}
SLOW = {("config.json", "train --resume")}  # a full resume for every damage


@pytest.fixture(scope="module")
def sources(
    conv_base: Path, photos: Path, scorer_models: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A run trained 2 steps with checkpoints at 1 and 2, the same run without its checkpoints, a
    sample of it with its sidecar, and a benchmark folder with its settings and one finished concept."""
    root = tmp_path_factory.mktemp("sources")
    assert main(train_argv(conv_base, photos, root / "run", "--checkpoint-every", "1")) == 0
    shutil.copytree(root / "run", root / "fresh", ignore=shutil.ignore_patterns("checkpoints"))
    sample = ["sample", "--base", str(conv_base), "--residuals", str(root / "run"), "--prompt",
              "a photo of a V* dog", "--out", str(root / "samples"), *SAMPLE]  # fmt: skip
    assert main(sample) == 0
    finished_benchmark(root)
    make_dataset(root / "dataset")
    assert main(benchmark("pet_dog")(Workspace(root, conv_base, photos, scorer_models))) == 0
    return root


def good_content(sources: Path, reader: Reader) -> bytes:
    """The file as persres leaves it; the lock as a train killed on this host leaves it (taken over)."""
    if reader.path.endswith(".lock"):
        holder = {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
        return json.dumps(holder).encode()  # a pid above Linux's largest: no process has it
    return (sources / reader.path).read_bytes()


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str
    before: dict[str, bytes | str]  # the workspace before the command, and after
    after: dict[str, bytes | str]


FOLDER = "a folder"


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes, and every folder (``FOLDER``), under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else FOLDER for p in root.rglob("*")}


def run(
    w: Workspace,
    sources: Path,
    reader: Reader,
    command: str,
    content: bytes,
    capsys: pytest.CaptureFixture[str],
) -> Outcome:
    """The command on a fresh copy of the sources whose ``reader.path`` holds ``content``."""
    shutil.rmtree(w.root, ignore_errors=True)
    shutil.copytree(sources, w.root)
    (w.root / reader.path).write_bytes(content)
    before = snapshot(w.root)
    capsys.readouterr()
    try:
        code = main(reader.commands[command](w))
    except Exception:  # what the user would see as a traceback; recorded, so every case is reported
        code, crash = -1, traceback.format_exc()
    else:
        crash = ""
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err + crash, before, snapshot(w.root))


def refusal_problem(w: Workspace, reader: Reader, outcome: Outcome) -> str | None:
    """What is wrong with a refusal: exit 2, one line naming the file, no traceback, nothing written."""
    err = outcome.err
    if "Traceback" in err + outcome.out:
        return f"a traceback: {err[-400:]}"
    if outcome.code != 2:
        return f"exit {outcome.code}, not 2 (stderr {err[-300:]!r})"
    if err.count("\n") != 1 or not err.endswith("\n"):
        return f"stderr is {err.count(chr(10))} lines: {err[:600]!r}"
    if str(w.root / reader.path) not in err:
        return f"stderr does not name {reader.path}: {err!r}"
    if len(err) > 1000:
        return f"stderr is {len(err)} characters: {err[:300]!r}..."
    changed = sorted(
        k
        for k in outcome.before.keys() | outcome.after.keys()
        if outcome.before.get(k) != outcome.after.get(k)
    )
    if changed:
        return f"files written or changed: {changed}"
    return None


def benign_problem(reference: Outcome, outcome: Outcome, reader: Reader) -> str | None:
    """A harmless damage gives what the undamaged file gives: exit 0, the same output, the same files
    (the damaged file aside where the command left it as it was)."""
    if outcome.code != 0:
        return f"exit {outcome.code}, not 0 as undamaged: {outcome.err[-300:]!r}"
    if outcome.out != reference.out:
        return f"prints {outcome.out[:300]!r}, undamaged {reference.out[:300]!r}"
    left = outcome.after.get(reader.path) == outcome.before[reader.path]
    files = {k for k in outcome.after.keys() | reference.after.keys() if not (left and k == reader.path)}
    differ = sorted(
        k for k in files if comparable(k, outcome.after.get(k)) != comparable(k, reference.after.get(k))
    )
    return f"files differ from the undamaged run's: {differ}" if differ else None


def comparable(path: str, data: bytes | str | None) -> object:
    """A file as it can be compared between two runs: safetensors as header and data (its writer orders
    the metadata at random), without the marker's creation time or the loss log's elapsed seconds."""
    if not isinstance(data, bytes):  # a folder, or nothing
        return data
    if path.endswith(".safetensors"):
        header, body = split_safetensors(data)
        return header, body
    if path.endswith("persres-run.json"):
        return {k: v for k, v in json.loads(data).items() if k != "created"}
    if path.endswith("loss.csv"):
        return [line.rpartition(b",")[0] for line in data.splitlines()]
    return data


CASES = [
    pytest.param(
        name, command, id=f"{name}-{command}", marks=[pytest.mark.slow] if (name, command) in SLOW else []
    )
    for name, reader in READERS.items()
    for command in reader.commands
]


@pytest.mark.parametrize(("name", "command"), CASES)
def test_a_damaged_file_is_refused_naming_it(
    sources: Path,
    conv_base: Path,
    photos: Path,
    scorer_models: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    command: str,
) -> None:
    reader = READERS[name]
    w = Workspace(tmp_path / "w", conv_base, photos, scorer_models)
    good = good_content(sources, reader)
    reference = run(w, sources, reader, command, good, capsys)
    assert reference.code == 0, f"the undamaged {name} fails {command}: {reference.err[-500:]}"
    problems = []
    for kind, content in reader.damages(good).items():
        outcome = run(w, sources, reader, command, content, capsys)
        if (name, command, kind) in BENIGN or (name, command, "*") in BENIGN:
            problem = benign_problem(reference, outcome, reader)
        else:
            problem = refusal_problem(w, reader, outcome)
        if problem:
            problems.append(f"{kind}: {problem}")
    assert not problems, f"{name} through {command}:\n" + "\n".join(problems)


CSV_EDITS = [
    *(
        (column, value)
        for column in ("clip_t", "clip_i", "dino_i")
        for value in ("abc", "1e999", "nan", "7", "-3")
    ),
    *((column, value) for column in ("train_seconds", "sample_seconds") for value in ("fast", "inf", "-1")),
    *(
        (column, value)
        for column in ("num_images", "trainable_parameters", "file_size_bytes", "peak_memory_bytes")
        for value in ("many", "1.5", "-1", "9" * 5000)
    ),
    *(("rank", value) for value in ("abc", "0", "1.5", "nan", "")),
    ("method", "gan"),
    ("sampler", "best"),
    ("concept", ""),
]


@pytest.mark.parametrize(("column", "value"), CSV_EDITS, ids=[f"{c}={v[:8]}" for c, v in CSV_EDITS])
def test_report_refuses_a_hand_edited_results_csv_naming_row_and_column(
    tmp_path: Path, column: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text in a score column, 1e999, NaN, a score outside its range: never shown as if measured."""
    bench = finished_benchmark(tmp_path)
    path = bench / "results.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[1][column] = value
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    assert main(["report", str(bench), "--out", str(tmp_path / "report.html")]) == 2
    err = capsys.readouterr().err
    named = f"row 2, column {column!r}" if value else "row 2, lacks the "
    assert err.count("\n") == 1 and f"{path} is damaged ({named}" in err and column in err, err
    assert not (tmp_path / "report.html").exists()


RESULT_EDITS = [
    ("rows", "clip_t", 7),
    ("rows", "clip_i", -2),
    ("rows", "dino_i", "0.7"),
    ("rows", "rank", 0),
    ("rows", "num_images", 2.5),
    ("rows", "method", "gan"),
    ("images", "clip_t", 3.0),
    ("images", "sampler", "best"),
    ("images", "prompt_category", "weather"),
]


@pytest.mark.parametrize(
    ("where", "field", "value"), RESULT_EDITS, ids=[f"{w}-{f}" for w, f, _ in RESULT_EDITS]
)
def test_report_refuses_a_hand_edited_result_json_naming_the_field(
    tmp_path: Path, where: str, field: str, value: object, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = finished_benchmark(tmp_path)
    path = bench / "runs" / "pet_dog" / "rank-0.05" / "result.json"
    result = json.loads(path.read_text())
    result[where][1][field] = value
    path.write_text(json.dumps(result))
    assert main(["report", str(bench), "--out", str(tmp_path / "report.html")]) == 2
    err = capsys.readouterr().err
    item = "row" if where == "rows" else "image"
    assert err.count("\n") == 1 and f"{path} is damaged ({item} 1 " in err and field in err, err
    assert not (tmp_path / "report.html").exists()
