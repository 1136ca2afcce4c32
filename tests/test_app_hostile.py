"""persres app under hostile input, through the real client against the app served in this process (fast:
no training): every number field walked with out-of-range, non-finite and fractional values; a run with
each kind of damaged file; an unexpected error; ``persres app`` with ``--runs`` at a file or a busy port."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from damage import csv_damages, json_damages
from helpers import free_port
from PIL import Image

from persres.app.photos import check_photo
from persres.config import TrainConfig
from persres.errors import InputError
from persres.toymodels import find_toy_model

SHIPPED_BASE = find_toy_model()  # the toy world in the checkout's models/

# Sent as JSON text (the client refuses to send NaN and infinity; a hostile client need not), then as
# strings (a JSON client may send a number as one): each must be refused naming the field.
BAD_JSON = ("NaN", "Infinity", "-Infinity", "-1e39", "1e20", "null", '"nan"', '"1e20"', '"ten"')
FRACTION = "1.5"  # refused where the field wants an integer
NOT_NUMBERS = ("null", '"nan"', '"1e20"', '"ten"')


@dataclass
class Served:
    page: Any
    client: Any
    url: str
    runs: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("gradio", reason="persres app needs gradio: make test installs the app extra")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from gradio_client import Client

    from persres.app import ui

    runs = tmp_path_factory.mktemp("hostile") / "runs"
    port = free_port()
    page = ui.launch(ui.AppSettings(str(SHIPPED_BASE), runs, "cpu"), "127.0.0.1", port, None, block=False)
    try:
        url = f"http://127.0.0.1:{port}/"
        yield Served(page, Client(url, verbose=False), url, runs)
    finally:
        page.close()


def raw_call(served: Served, api_name: str, data: list[str]) -> tuple[str, str]:
    """Call ``api_name`` with ``data`` as JSON texts (NaN included) over gradio's HTTP API: (event, data)."""
    import httpx

    body = '{"data": [' + ", ".join(data) + "]}"
    sent = httpx.post(
        f"{served.url}gradio_api/call/{api_name}", content=body, headers={"Content-Type": "application/json"}
    )
    assert sent.status_code == 200, sent.text
    answer = httpx.get(f"{served.url}gradio_api/call/{api_name}/{sent.json()['event_id']}", timeout=60)
    events = [line.removeprefix("event: ") for line in answer.text.splitlines() if line.startswith("event: ")]
    datas = [line.removeprefix("data: ") for line in answer.text.splitlines() if line.startswith("data: ")]
    return events[-1], datas[-1]


def number_inputs(served: Served) -> list[tuple[Any, Any]]:
    """(event, component) for every number or slider input of every event of the page."""
    import gradio as gr

    return [
        (fn, c) for fn in served.page.fns.values() for c in fn.inputs if isinstance(c, (gr.Number, gr.Slider))
    ]


def test_every_number_field_refuses_bad_values_naming_itself(served: Served) -> None:
    import gradio as gr

    from persres.app.fields import RULE

    found = number_inputs(served)
    labels = sorted({c.label for _, c in found})
    assert labels == ["LAG's masks at denoising step", "denoising steps", "learning rate", "seed", "steps"]
    before = set(served.runs.rglob("*")) if served.runs.exists() else set()
    for fn, field in found:
        rule = getattr(field, RULE, None)
        assert rule is not None, f"{field.label} ({fn.api_name}) is not checked against persres.ranges"
        sent = [i for i in fn.inputs if not isinstance(i, gr.State)]  # states stay on the server
        good = [json.dumps(i.value) if isinstance(i, (gr.Number, gr.Slider)) else "null" for i in sent]
        for bad in BAD_JSON + ((FRACTION,) if rule.whole else ()):
            data = [bad if i is field else g for i, g in zip(sent, good, strict=True)]
            event, message = raw_call(served, fn.api_name, data)
            assert event == "error", (field.label, bad, message)
            named = f"{field.label}: must be" in message
            if isinstance(field, gr.Slider) and not named:  # gradio checks a slider first (fields.py):
                beyond = "than maximum value" in message or "than minimum value" in message  # drawn bounds
                named = beyond or (bad in NOT_NUMBERS and message == '{"error": null}')  # "Error", no trace
            assert named, (field.label, bad, message)
    assert (set(served.runs.rglob("*")) if served.runs.exists() else set()) == before  # nothing written


def test_the_rank_field_refuses_bad_values_naming_itself(served: Served) -> None:
    from gradio_client.exceptions import AppError

    before = set(served.runs.rglob("*")) if served.runs.exists() else set()
    for bad in ("nan", "inf", "-1e39", "1e20", "1.5", "-3", "0", "ten", ""):
        with pytest.raises(AppError, match="rank"):
            served.client.predict(None, "dog", "sks", "r", 10, 5e-3, bad, api_name="/train")
    assert (set(served.runs.rglob("*")) if served.runs.exists() else set()) == before


def test_the_fields_share_the_command_lines_ranges() -> None:
    pytest.importorskip("gradio")
    from persres import ranges
    from persres.cli import options

    assert options.SEED("4294967295") == ranges.SEED.check(4294967295.0) == 2**32 - 1
    for rule, parse in ((ranges.SEED, options.SEED), (ranges.STEPS, options.STEPS)):
        for text in ("1e20", "nan", "-1", "1.5", "4294967296", "1001"):
            try:
                parse(text)
            except Exception as exc:  # argparse's ArgumentTypeError
                with pytest.raises(ValueError) as caught:
                    rule.check(text)
                assert str(caught.value) == str(exc)
            else:
                assert rule.check(text) == parse(text)


# --- one damaged run among good ones ---------------------------------------------------------------


GOOD = {  # the files of an interrupted run, as train writes them
    "config.json": json.dumps(
        {"persres_version": "0", **TrainConfig(base="b", images="i", class_word="dog", steps=8).to_dict()}
    ).encode(),
    "logs/loss.csv": b"step,loss,smoothed_loss,lr,elapsed_seconds\n"
    + b"".join(f"{s},{1 / s!r},{1 / s!r},0.005,{s / 10:.3f}\n".encode() for s in range(1, 6)),
}
LOCK = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01"}).encode()


def make_run(runs: Path, name: str) -> Path:
    from persres.formats.runfolder import write_marker

    folder = runs / name
    (folder / "logs").mkdir(parents=True)
    write_marker(folder, [relative for relative in GOOD if not relative.startswith(".")])
    for relative, good in GOOD.items():
        (folder / relative).write_bytes(good)
    return folder


def damage_cases() -> list[tuple[str, str, bytes]]:
    """(file in the run, kind, damaged bytes) for each file the Runs page reads."""
    return [
        *(("config.json", kind, bad) for kind, bad in json_damages(GOOD["config.json"]).items()),
        *(("logs/loss.csv", kind, bad) for kind, bad in csv_damages(GOOD["logs/loss.csv"]).items()),
        *((".persres.lock", kind, bad) for kind, bad in json_damages(LOCK).items()),
    ]


def expect_damaged(path: Path) -> bool:
    """What the library's reader says of the file: damaged (it refuses it), or still good."""
    from persres.formats.runs import read_config

    if path.name != "config.json":
        return True  # every damage of a loss log or a lock is damage
    try:
        read_config(path, "test")
    except Exception:
        return True
    return False


@pytest.fixture(scope="module")
def two_runs(served: Served) -> tuple[Path, Path]:
    return make_run(served.runs, "good"), make_run(served.runs, "broken")


@pytest.mark.parametrize(("relative", "kind", "bad"), damage_cases(), ids=lambda v: str(v)[:20])
def test_a_damaged_run_is_listed_as_such_and_the_others_still_are(
    served: Served, two_runs: tuple[Path, Path], relative: str, kind: str, bad: bytes
) -> None:
    from gradio_client.exceptions import AppError

    good, broken = two_runs
    broken.joinpath(".persres.lock").unlink(missing_ok=True)  # the run as it was before the last case
    for name, content in GOOD.items():
        broken.joinpath(name).write_bytes(content)
    target = broken / relative
    target.write_bytes(bad)
    os.utime(target, (0, 0))  # not a lock being written this moment: a stale one
    damaged = expect_damaged(target)
    _, table = served.client.predict(api_name="/runs")
    rows = {row[0]: row[1] for row in table["data"]}
    assert sorted(rows) == ["broken", "good"] and rows["good"] == "interrupted"
    if damaged:
        assert rows["broken"].startswith("damaged: ") and relative.split("/")[-1] in rows["broken"]
    else:
        assert rows["broken"] == "interrupted"
    if not damaged:
        info, _, _ = served.client.predict("broken", api_name="/show_run")
        assert info["status"] == "interrupted" and info["steps done"] == 5
        return
    calls = (("broken",), "/show_run"), (("broken", "residuals"), "/download"), (("broken",), "/resume")
    for args, api in calls:
        with pytest.raises(AppError) as caught:
            served.client.predict(*args, api_name=api)
        message = str(caught.value)
        assert "unexpected" not in message and "Traceback" not in message, (api, message)
        if api != "/download" or relative == "config.json":  # download needs the settings, not the log
            assert relative.split("/")[-1] in message, (api, message)


# --- unexpected errors ------------------------------------------------------------------------------


def test_every_handler_shows_its_errors_as_a_message(served: Served) -> None:
    unwrapped = [fn.api_name for fn in served.page.fns.values() if not getattr(fn.fn, "refuses", False)]
    assert unwrapped == []


def test_an_unexpected_error_is_one_short_line_and_its_traceback_is_logged(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gradio_client.exceptions import AppError

    from persres.app import jobs

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("internal detail /srv/secret/path")

    monkeypatch.setattr(jobs, "sample_runs", broken)
    with pytest.raises(AppError) as caught:
        served.client.predict(["good"], "a photo of a V* dog", "both", 0, 5, api_name="/sample")
    message = str(caught.value)
    assert "unexpected RuntimeError" in message and "server's log" in message
    assert "secret" not in message and "Traceback" not in message
    assert "internal detail /srv/secret/path" in caplog.text and "Traceback" in caplog.text


# --- persres app: its folder and its port -----------------------------------------------------------


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    pytest.importorskip("gradio")
    from persres.app import ui

    launched: list[tuple[object, ...]] = []
    monkeypatch.setattr(ui, "launch", lambda *args: launched.append(args))
    return launched


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    from persres.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_app_refuses_runs_at_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_launch: list[tuple[object, ...]]
) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for runs in (afile, afile / "runs"):
        err = one_line_error(capsys, ["app", "--runs", str(runs), "--port", str(free_port())])
        assert "--runs" in err and "is a file" in err
    assert no_launch == [] and afile.read_text() == "mine" and sorted(tmp_path.iterdir()) == [afile]


def test_app_refuses_a_busy_port(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_launch: list[tuple[object, ...]]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = one_line_error(capsys, ["app", "--runs", str(tmp_path / "runs"), "--port", str(port)])
    assert f"--port {port}" in err and "already serves" in err
    assert no_launch == [] and not (tmp_path / "runs").exists()


# --- uploads ----------------------------------------------------------------------------------------


def test_an_upload_past_pils_limit_is_reported_with_its_real_size(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    Image.new("1", (14_000, 14_000)).save(huge)  # 196 megapixels: PIL refuses it on opening
    with pytest.raises(InputError, match=r"huge.png has 196,000,000 pixels, above the app's limit"):
        check_photo(huge)
