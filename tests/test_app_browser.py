"""`pasam app` in a real browser: Playwright drives Debian's Chromium (headless) against the app started as a
subprocess on 127.0.0.1, with a tiny model. Skips, with the reason, where Chromium, Playwright or Gradio is missing
(`.ci/run` installs them)."""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_config

from pasam_hf import PASamModel, PASamProcessor
from pasam_hf.benchmarking import synthetic_photo

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run",
]
SRC = Path(__file__).resolve().parents[1] / "src"


def _missing() -> str | None:
    for module, install in (("playwright", "pip install playwright"), ("gradio", 'pip install "pasam-hf[app]"')):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    if not CHROMIUM.is_file():
        return f"no browser at {CHROMIUM} (apt-get install chromium)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser tests need Chromium: {_missing()}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """`pasam app --model <tiny model>` on a free port; its URL once it answers."""
    folder = tmp_path_factory.mktemp("app")
    config = tiny_config()
    torch.manual_seed(0)
    PASamModel(config).save_pretrained(folder / "model")
    PASamProcessor.from_model_config(config).save_pretrained(folder / "model")
    port = _free_port()
    log = open(folder / "app.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    server = subprocess.Popen(
        [sys.executable, "-m", "pasam_hf", "app", "--model", str(folder / "model"), "--port", str(port),
         "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"pasam app exited with {server.returncode}: {(folder / 'app.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"pasam app did not answer within 90 s: {(folder / 'app.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def _status_contains(page, text: str, timeout: float = 30_000) -> str:
    page.wait_for_function(
        "text => document.querySelector('#status').innerText.includes(text)", arg=text, timeout=timeout
    )
    return page.inner_text("#status")


def _canvas_pixels(page) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(page.locator("#canvas").screenshot())).convert("RGB"))


def _click_canvas(page, fx: float, fy: float) -> None:
    """Click at a fraction `(fx, fy)` of the shown picture, which Gradio centres in its element at natural size
    (or smaller)."""
    picture = page.locator("#canvas img").first
    box = picture.bounding_box()
    natural_width, natural_height = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    scale = min(box["width"] / natural_width, box["height"] / natural_height, 1)
    left = (box["width"] - natural_width * scale) / 2
    top = (box["height"] - natural_height * scale) / 2
    picture.click(position={"x": left + natural_width * scale * fx, "y": top + natural_height * scale * fy})


def _changed(before: np.ndarray, after: np.ndarray) -> float:
    if before.shape != after.shape:
        return 1.0
    return float((np.abs(before.astype(int) - after.astype(int)).sum(axis=-1) > 30).mean())


def _canvas_changes(page, before: np.ndarray, fraction: float, timeout: float = 20.0) -> np.ndarray:
    """The canvas once at least `fraction` of its pixels differ from `before` (the new picture arrives after the
    status text: the browser fetches and decodes it)."""
    deadline = time.monotonic() + timeout
    while True:
        now = _canvas_pixels(page)
        if _changed(before, now) > fraction:
            return now
        if time.monotonic() > deadline:
            pytest.fail(f"the picture changed in only {_changed(before, now):.4f} of its pixels within {timeout} s")
        page.wait_for_timeout(200)


def test_click_to_segment_in_the_browser(app_url, browser, tmp_path) -> None:
    photo = tmp_path / "photo.png"
    PIL.Image.fromarray(synthetic_photo(360, 480, seed=5)).save(photo)
    requests = []
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.on("request", lambda request: requests.append(request.url))
    page.goto(app_url)
    assert "Upload a photo" in page.inner_text("#status")

    # Upload a photo: it is shown, features computed.
    page.locator("#upload input[type=file]").set_input_files(str(photo))
    _status_contains(page, "Click on an object")
    page.wait_for_function(
        "() => { const img = document.querySelector('#canvas img'); return img && img.complete && img.naturalWidth; }"
    )
    plain = _canvas_pixels(page)

    # A click: the overlay appears.
    _click_canvas(page, 0.5, 0.5)
    _status_contains(page, "1 foreground point: mask of")
    first = _canvas_changes(page, plain, 0.01)
    assert page.locator("#mask-download").is_visible()

    # A negative point changes it.
    page.get_by_label("background point").check()
    _click_canvas(page, 0.15, 0.2)
    _status_contains(page, "1 foreground point, 1 background point")
    _canvas_changes(page, first, 0.0005)

    # A box by two clicks.
    page.get_by_label("box (two corners)").check()
    _click_canvas(page, 0.3, 0.3)
    _status_contains(page, "First corner of the box set")
    _click_canvas(page, 0.8, 0.85)
    _status_contains(page, "a box: mask of")

    # The explain view and SAM's three masks.
    page.locator("#explain input[type=checkbox]").check()
    page.locator("#explain-view img").first.wait_for(timeout=30_000)
    page.locator("#multimask input[type=checkbox]").check()
    _status_contains(page, "best of 3 masks")
    page.wait_for_function("document.querySelectorAll('#candidates img').length === 3", timeout=30_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "app.jpg"), full_page=True, type="jpeg", quality=80)

    # A second visitor has a page of their own.
    other = browser.new_page()
    other.goto(app_url)
    assert "Upload a photo" in other.inner_text("#status")
    other.close()
    assert "a box" in page.inner_text("#status")

    # A text file named .png: the message, and the page goes on.
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture\n")
    page.locator("#upload input[type=file]").set_input_files(str(fake))
    _status_contains(page, "notes.png is not an image the page can read")
    assert "previous image stays" in page.inner_text("#status")
    page.get_by_label("foreground point").check()
    _click_canvas(page, 0.5, 0.5)
    _status_contains(page, "mask of")

    # Nothing but the app itself was contacted.
    hosts = {url.split("/")[2] for url in requests if url.startswith("http")}
    assert hosts == {app_url.split("/")[2]}, hosts
    page.close()
    # docs/images/app.jpg is this picture from a run of this test (pytest --basetemp=DIR keeps it in DIR).
    assert (tmp_path / "app.jpg").stat().st_size > 10_000
