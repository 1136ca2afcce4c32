"""persres app, driven by gradio_client (the real client) against the app served in this process on
a free port, in the shipped toy world: example -> train -> sample both; two trainings queued together;
hostile input refused in the page while the server keeps serving. And the app's pieces without gradio."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port
from PIL import Image

from persres.app import runstore
from persres.app.jobs import parse_rank
from persres.app.photos import MAX_PIXELS, check_photo
from persres.errors import ConfigError, InputError
from persres.toymodels import TOY_BASES, find_toy_model

SHIPPED_BASE = find_toy_model()  # the toy world in the checkout's models/
STEPS = 20  # enough to write residuals, checkpoints, the loss curve and a validation grid


@dataclass
class Served:
    client: object
    url: str
    runs: Path
    outside: Path  # the folder holding runs/: nothing else may appear in it


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("gradio", reason="persres app needs gradio: make test installs the app extra")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from gradio_client import Client

    from persres.app import ui

    outside = tmp_path_factory.mktemp("app")
    runs = outside / "runs"
    port = free_port()
    page = ui.launch(ui.AppSettings(str(SHIPPED_BASE), runs, "cpu"), "127.0.0.1", port, None, block=False)
    try:
        url = f"http://127.0.0.1:{port}/"
        yield Served(Client(url, verbose=False), url, runs, outside)
    finally:
        page.close()


def train(served: Served, photos: list[str], name: str, steps: int = STEPS) -> object:
    from gradio_client import handle_file

    files = [handle_file(p) for p in photos]
    return served.client.submit(files, "dog", "sks", name, steps, 5e-3, "0.05", api_name="/train")  # type: ignore[attr-defined]


def refused(served: Served, *args: object, api_name: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as caught:
        served.client.predict(*args, api_name=api_name)  # type: ignore[attr-defined]
    return str(caught.value)


@pytest.mark.slow
def test_example_train_sample_both_and_download(served: Served) -> None:
    photos, class_word, name = served.client.predict(api_name="/example")  # type: ignore[attr-defined]
    assert (len(photos), class_word, name) == (5, "dog", "red-striped-dog")
    status, curve = train(served, photos, name).result()  # type: ignore[attr-defined]
    run = served.runs / "red-striped-dog"
    assert f"step {STEPS}/{STEPS}" in status and "Finished" in status
    assert Image.open(curve).size[0] > 300  # the loss curve, drawn
    assert (run / "residuals.safetensors").is_file() and (run / "logs" / "loss.png").is_file()
    kept = sorted((served.runs / ".photos" / "red-striped-dog").iterdir())
    assert [p.name for p in kept] == [f"photo-{i:02d}.png" for i in range(5)]

    results, masks, slider = served.client.predict(  # type: ignore[attr-defined]
        ["red-striped-dog"], "a photo of a V* dog on the beach", "both", 0, 10, api_name="/sample"
    )
    assert [r["caption"] for r in results] == ["normal", "LAG"]
    normal, lag = (np.asarray(Image.open(r["image"])) for r in results)
    assert normal.shape == lag.shape and not np.array_equal(normal, lag)  # LAG changed the image
    assert [m["caption"] for m in masks] == ["step 10/10: 8x8 blocks", "step 10/10: 4x4 blocks"]
    assert slider["maximum"] == 9
    written = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert any(n.endswith("-normal.png") for n in written) and any(n.endswith("-lag.png") for n in written)

    info, plot, grids = served.client.predict("red-striped-dog", api_name="/show_run")  # type: ignore[attr-defined]
    assert info["status"] == "finished" and info["steps done"] == STEPS and plot is not None
    assert [g["caption"] for g in grids] == [f"step {STEPS}"]
    lora = served.client.predict("red-striped-dog", "kohya", api_name="/download")  # type: ignore[attr-defined]
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        assert f.metadata()["persres_trigger"] == "sks dog"
    assert (run / "exports" / "red-striped-dog-kohya.safetensors").is_file()
    assert sorted(p.name for p in served.outside.iterdir()) == ["runs"]


@pytest.mark.slow
def test_two_trainings_submitted_together_run_one_after_the_other(served: Served, tmp_path: Path) -> None:
    photos = toy_photos(tmp_path)
    first, second = train(served, photos, "twin"), train(served, photos, "twin")
    assert "Finished" in first.result()[0] and "Finished" in second.result()[0]  # type: ignore[attr-defined]
    one, two = served.runs / "twin", served.runs / "twin-2"
    assert (one / "residuals.safetensors").is_file() and (two / "residuals.safetensors").is_file()
    spans = sorted(training_span(run) for run in (one, two))
    assert spans[0][1] <= spans[1][0]  # the later run started after the earlier one had finished


def training_span(run: Path) -> tuple[float, float]:
    """(when the run claimed its folder, when its residuals were written)."""
    started = (run / "persres-run.json").stat().st_mtime
    return started, (run / "residuals.safetensors").stat().st_mtime


def toy_photos(folder: Path) -> list[str]:
    from persres.toyworld.experiment import reference_photos

    return [str(p) for p in sorted(reference_photos(("cat", "blue", "dotted"), folder / "cat", 3).iterdir())]


@pytest.mark.slow
def test_hostile_input_is_refused_in_the_page_and_the_server_keeps_serving(
    served: Served, tmp_path: Path
) -> None:
    from gradio_client import handle_file

    photos = toy_photos(tmp_path)
    notes = tmp_path / "notes.png"
    notes.write_text("not an image at all")
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 5_000)).save(huge)  # 50 megapixels, a few kB on disk
    before = set(served.runs.rglob("*")) if served.runs.exists() else set()
    for bad, why in ((notes, "notes.png is not an image"), (huge, "huge.png has 50,000,000 pixels")):
        files = [handle_file(p) for p in [*photos, str(bad)]]
        message = refused(served, files, "dog", "sks", "bad", 5, 5e-3, "0.05", api_name="/train")
        assert why in message
        thumbs, checked = served.client.predict(files, api_name="/preview")  # type: ignore[attr-defined]
        assert len(thumbs) == 3 and why in checked
    assert "no run '../red-striped-dog'" in refused(
        served, "../red-striped-dog", "residuals", api_name="/download"
    )
    assert "no run 'missing'" in refused(
        served, ["missing"], "a photo of a V* dog", "both", 0, 5, api_name="/sample"
    )
    assert "no run '/etc'" in refused(served, "/etc", api_name="/resume")
    big = tmp_path / "big.jpg"
    big.write_bytes(os.urandom(21 * 2**20))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks first
        served.client.predict([handle_file(str(big))], api_name="/preview")  # type: ignore[attr-defined]
    import httpx

    sent = httpx.post(f"{served.url}gradio_api/upload", files={"files": ("big.jpg", big.read_bytes())})
    assert sent.status_code == 413  # and the server refuses it too
    assert set(served.runs.rglob("*")) == before  # nothing kept of the refused requests
    assert sorted(p.name for p in served.outside.iterdir()) == ["runs"]
    hint = served.client.predict("a painting of a V* dog", api_name="/hint")  # type: ignore[attr-defined]
    assert "artistic style" in hint and "normal" in hint


def test_run_names_are_made_safe_and_unique(tmp_path: Path) -> None:
    assert runstore.safe_name("../../etc/passwd") == "etc-passwd"
    assert runstore.safe_name("My Dog!") == "my-dog"
    assert runstore.safe_name("..") == "concept" and runstore.safe_name("/") == "concept"
    runs = tmp_path / "runs"
    made = [runstore.new_run(runs, "../x") for _ in range(3)]
    assert [p.name for p in made] == ["x", "x-2", "x-3"]
    assert all(p.parent == runs for p in made) and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_only_listed_runs_are_found(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "persres-run.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "persres-run.json").write_text("{}")
    assert runstore.run_folder(runs, "mine") == runs / "mine"
    for name in ("../outside", str(tmp_path / "outside"), "mine/..", "", "missing"):
        with pytest.raises(InputError, match="no run"):
            runstore.run_folder(runs, name)


def test_photos_are_decoded_and_limited(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    assert check_photo(good).size == (40, 30)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match="fake.png is not an image"):
        check_photo(fake)
    wide = tmp_path / "wide.png"
    Image.new("1", (MAX_PIXELS // 1000 + 1, 1000)).save(wide)
    with pytest.raises(InputError, match="wide.png has .* pixels, above the app's limit"):
        check_photo(wide)


def test_rank_field_reads_as_train_rank() -> None:
    assert parse_rank("0.05") == 0.05 and parse_rank("16") == 16 and isinstance(parse_rank("16"), int)
    assert parse_rank("1.0") == 1.0 and isinstance(parse_rank("1.0"), float)


def test_cli_auth_and_missing_gradio(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from persres.cli import main
    from persres.cli.app import parse_auth

    assert parse_auth("ann:secret:x") == ("ann", "secret:x") and parse_auth(None) is None
    with pytest.raises(ConfigError, match="USER:PASSWORD"):
        parse_auth("ann")
    import persres.app

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    monkeypatch.delitem(sys.modules, "persres.app.ui", raising=False)
    monkeypatch.delattr(persres.app, "ui", raising=False)
    assert main(["app"]) == 2
    assert "pip install 'persres[app]'" in capsys.readouterr().err


def test_cli_warns_when_serving_beyond_localhost_without_auth(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    pytest.importorskip("gradio")
    from persres.app import ui
    from persres.cli.app import run_app

    launched: list[tuple[object, ...]] = []
    monkeypatch.setattr(ui, "launch", lambda *args: launched.append(args))
    port = free_port()  # persres app binds it for a moment to see that it is free
    args = argparse.Namespace(base=None, runs=str(tmp_path / "runs"), host="0.0.0.0", port=port, auth=None,
                              clip=None, nouns=None, device="cpu")  # fmt: skip
    assert run_app(args) == 0 and "without a login" in caplog.text
    caplog.clear()
    assert run_app(argparse.Namespace(**{**vars(args), "auth": "ann:pw"})) == 0
    assert "without a login" not in caplog.text and launched[-1][3] == ("ann", "pw")
    assert launched[0][1:3] == ("0.0.0.0", port) and json.dumps(str(launched[0][0].base))  # type: ignore[attr-defined]
    shipped = tuple(str(find_toy_model(name)) for name in TOY_BASES)  # the U-Net's first, then the Flux one
    assert launched[0][0].bases == shipped and len(set(shipped)) == 2  # type: ignore[attr-defined]


@pytest.mark.slow
def test_an_interrupted_run_is_resumed_from_the_runs_page(served: Served, tmp_path: Path) -> None:
    from persres.app import jobs
    from persres.training.train import train

    job = jobs.start_training(
        served.runs, "halted", toy_photos(tmp_path), str(SHIPPED_BASE), "cat", "sks", 12, 5e-3, "0.05", "cpu"
    )

    class Stop(Exception):
        pass

    def stop_at_7(step: int, loss: float) -> None:  # the server went down after step 7
        if step == 7:
            raise Stop

    with pytest.raises(Stop):
        train(job.config, job.out, device="cpu", progress=False, callback=stop_at_7)
    info = served.client.predict("halted", api_name="/show_run")[0]  # type: ignore[attr-defined]
    assert (info["status"], info["steps done"]) == ("interrupted", 7)
    status, _ = served.client.predict("halted", api_name="/resume")  # type: ignore[attr-defined]
    assert "step 12/12" in status and "Finished" in status
    assert [step for step, _ in runstore.losses(served.runs / "halted")] == list(range(1, 13))
    assert "is finished" in refused(served, "halted", api_name="/resume")


def test_mask_overlays_tint_only_where_lag_applied_the_residuals() -> None:
    import torch

    from persres.app.masks import overlays
    from persres.inference.sampling import Sample

    image = Image.new("RGB", (8, 8), (10, 200, 10))
    half = torch.zeros(1, 1, 16)  # a 4x4 block: the residual applied in the top half only
    half[0, 0, :8] = 1
    masks = {
        0: {"down": torch.zeros(1, 1, 64), "mid": torch.zeros(1, 1, 16)},
        1: {"down": torch.ones(1, 1, 64), "mid": half},
    }
    item = Sample("a V* dog", "a sks dog", 0, "lag", image, masks, latent_size=(8, 8))
    first, last = overlays(item, 0), overlays(item, 99)  # past the end: the last step
    assert [c for _, c in last] == ["step 2/2: 8x8 blocks", "step 2/2: 4x4 blocks"]
    assert np.array_equal(
        np.asarray(first[0][0]), np.asarray(image.resize((256, 256), Image.Resampling.NEAREST))
    )
    fine, coarse = (np.asarray(shown, dtype=int) for shown, _ in last)
    assert fine.shape == (256, 256, 3) and (fine[..., 0] > 100).all()  # mask 1 everywhere: all tinted red
    assert (coarse[:128, :, 0] > 100).all() and (coarse[128:] == [10, 200, 10]).all()  # top half only


def test_class_word_suggestions_come_from_the_configured_clip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("gradio")
    from persres.app.common import AppSettings
    from persres.app.train_page import suggest_class
    from persres.evaluation.evaluate import Scorers
    from persres.evaluation.macro import load_nouns, suggest_classes
    from persres.testing.tiny import save_tiny_clip

    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path / "cache"))
    clip = save_tiny_clip(tmp_path / "clip")
    nouns = tmp_path / "nouns.txt"
    nouns.write_text("dog\ncat\ncup\ncar\nchair\nball\n")
    photos = toy_photos(tmp_path)
    (tmp_path / "runs").mkdir()
    update = suggest_class(AppSettings("unused", tmp_path / "runs", "cpu", str(clip), str(nouns)), photos)
    scorers = Scorers.load(str(clip), None, "cpu")
    expected = suggest_classes(
        scorers, Path(photos[0]).parent, top=5, nouns=load_nouns(nouns), progress=False
    )
    assert update["value"] == expected[0].noun
    assert update["info"] == "suggested: " + ", ".join(s.noun for s in expected)
    assert list((tmp_path / "runs").iterdir()) == []  # the photos were checked in a folder since removed


def test_a_resumed_trainings_curve_starts_with_the_steps_before_its_checkpoint(tmp_path: Path) -> None:
    from persres.app.jobs import TrainingJob
    from persres.config import TrainConfig

    (tmp_path / "logs").mkdir()
    rows = "".join(f"{step},{step / 10!r},0.0,0.001,0.0\n" for step in range(1, 10))  # 9 steps, then killed
    (tmp_path / "logs" / "loss.csv").write_text("step,loss,smoothed_loss,lr,elapsed_seconds\n" + rows)
    job = TrainingJob(TrainConfig(base="b", images="i", class_word="dog", steps=10), tmp_path, True, "cpu")

    def resumed_from_step_6() -> None:
        for step in (7, 8, 9, 10):
            job.events.put((step, 1.0))
        job.events.put(None)

    job.thread = threading.Thread(target=resumed_from_step_6)
    *_, last = job.updates(poll_s=0.01)
    assert last.done and last.error is None
    assert last.losses == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
        (4, 0.4),
        (5, 0.5),
        (6, 0.6),
        (7, 1.0),
        (8, 1.0),
        (9, 1.0),
        (10, 1.0),
    ]


def test_emptied_number_fields_are_named() -> None:
    from persres.app.jobs import TOY_RECIPE, make_config

    with pytest.raises(ConfigError, match="`steps` must be >= 1"):
        make_config("b", Path("p"), "dog", "sks", None, 5e-3, "0.05", TOY_RECIPE)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`lr` must be in"):
        make_config("b", Path("p"), "dog", "sks", 10, None, "0.05", TOY_RECIPE)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank 'x'"):
        make_config("b", Path("p"), "dog", "sks", 10, 5e-3, "x", TOY_RECIPE)


@pytest.mark.parametrize("run", ["residuals-run", "lora-run"])
def test_a_finished_run_of_any_method_is_listed_as_finished(run: str, tmp_path: Path) -> None:
    """The status asks the run folder where the method's result is (a LoRA run has no residual file)."""
    folder = tmp_path / run
    shutil.copytree(Path(__file__).parent / "data" / "run-before-backbones" / run, folder)
    assert runstore.run_info(folder).status == "finished"
    result = next(p for p in folder.iterdir() if p.name in ("residuals.safetensors", "result"))
    if result.is_dir():
        shutil.rmtree(result)
    else:
        result.unlink()
    assert runstore.run_info(folder).status == "interrupted"
