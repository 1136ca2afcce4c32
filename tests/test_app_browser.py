"""persres app in a real browser: headless Chromium (Debian's ``chromium``, driven by playwright from
PyPI with ``executable_path``: playwright's own browser download is not reachable here) uploads photos,
sees a non-image refused by name, trains, samples ``both`` and sees the result images and LAG's masks;
then picks the toy world's Flux-shaped base (served beside the U-Net's, as ``persres app`` does by
default), sees the recipe's fields reset to that base's, and trains on it. Screenshots go to the test's
output folder; the sampled page is also copied to docs/app.png (README)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome")  # binary first
STEPS = 30


def find_chromium() -> str | None:
    for name in CHROMIUM:
        found = name if os.path.isfile(name) and os.access(name, os.X_OK) else shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.slow
def test_upload_train_sample_in_a_browser(tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found (looked for /usr/lib/chromium/chromium, chromium, chromium-browser): "
                    "apt-get install chromium (.ci/run does) to run the browser test")  # fmt: skip
    pytest.importorskip("gradio", reason="persres app needs gradio: make test installs the app extra")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from persres.app import ui
    from persres.toymodels import TOY_BASES, find_toy_model
    from persres.toyworld.experiment import reference_photos

    photos = sorted(reference_photos(("dog", "red", "striped"), tmp_path / "photos").iterdir())
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    port = free_port()
    unet, flux = (str(find_toy_model(name)) for name in TOY_BASES)
    settings = ui.AppSettings(unet, tmp_path / "runs", "cpu", others=(flux,))
    server = ui.launch(settings, "127.0.0.1", port, None, False)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            upload = page.locator("#photos input[type=file]")
            upload.set_input_files([str(p) for p in [*photos[:2], notes]])
            page.wait_for_selector("#checked :text('refused: notes.png is not an image')", timeout=20_000)
            page.locator("#photos button[aria-label='Clear']").first.click()
            upload.set_input_files([str(p) for p in photos])
            page.wait_for_function("document.querySelectorAll('#thumbs img').length == 5", timeout=20_000)
            page.locator("#class-word textarea, #class-word input").first.fill("dog")
            page.get_by_text("advanced").click()
            assert page.locator("#mask-attention input").first.is_checked()  # the toy U-Net's recipe
            page.locator("#steps input").first.fill(str(STEPS))
            page.locator("#train").click()
            page.wait_for_selector("#train-status :text('Finished')", timeout=120_000)
            page.wait_for_selector("#loss img", timeout=10_000)
            page.screenshot(path=shots / "1-trained.png", full_page=True)
            assert (tmp_path / "runs" / "sks-dog" / "residuals.safetensors").is_file()

            page.get_by_role("tab", name="Sample").click()
            page.locator("#sample-runs input").first.click()
            page.locator("[role=option]", has_text="sks-dog").click()
            page.locator("#sample").click()
            page.wait_for_function("document.querySelectorAll('#results img').length == 2", timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#masks img').length >= 2", timeout=10_000)
            page.locator("#prompt textarea, #prompt input").first.click()  # closes the dropdown
            page.screenshot(path=shots / "2-sampled.png", full_page=True)
            sizes = page.eval_on_selector_all("#results img", "els => els.map(e => e.naturalWidth)")
            assert len(sizes) == 2 and all(width >= 256 for width in sizes)  # both images drawn, enlarged

            page.get_by_role("tab", name="Runs").click()
            page.wait_for_function(
                "document.querySelector('#runs-table').innerText.includes('finished')", timeout=10_000
            )
            page.screenshot(path=shots / "3-runs.png", full_page=True)

            page.get_by_role("tab", name="Train").click()
            page.locator("#steps input").first.fill("7")
            page.locator("#base input").first.click()
            options = page.locator("[role=option]").all_inner_texts()
            offered = [text.removeprefix("✓").strip() for text in options]
            assert offered == [  # the U-Net's chosen
                f"the shipped toy world, Stable Diffusion 1.x/2.x-shaped (models/{Path(unet).name})",
                f"the shipped toy world, Flux.1-shaped (models/{Path(flux).name})",
            ]
            page.locator("[role=option]", has_text="Flux.1-shaped").click()
            page.wait_for_function("document.querySelector('#steps input').value == '400'", timeout=10_000)
            page.wait_for_function("!document.querySelector('#mask-attention input').checked", timeout=10_000)
            page.locator("#steps input").first.fill(str(STEPS))
            page.locator("#run-name textarea, #run-name input").first.fill("flux-dog")
            page.locator("#train").click()
            status = "document.querySelector('#train-status').innerText"
            done = f"{status}.includes('flux-dog: step {STEPS}/{STEPS}') && {status}.includes('Finished')"
            page.wait_for_function(done, timeout=120_000)
            page.screenshot(path=shots / "4-trained-on-flux.png", full_page=True)
            browser.close()
    finally:
        server.close()
    first = json.loads((tmp_path / "runs" / "sks-dog" / "config.json").read_text())
    assert (first["mask"], first["timestep_weighting"]) == ("attention-trained", "min-snr")
    config = json.loads((tmp_path / "runs" / "flux-dog" / "config.json").read_text())
    assert (config["base"], config["steps"]) == (flux, STEPS)
    assert (config["mask"], config["timestep_weighting"]) == ("none", "none")
    assert (tmp_path / "runs" / "flux-dog" / "residuals.safetensors").is_file()
    if os.access(ROOT / "docs", os.W_OK):
        shutil.copyfile(shots / "2-sampled.png", ROOT / "docs" / "app.png")
