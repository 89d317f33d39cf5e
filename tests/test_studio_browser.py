"""msdda studio in a real browser: Debian's Chromium driven by Playwright, against the page served in-process.

Moving a weight slider must bring new images that differ from the previous ones and are, pixel for pixel (the
page serves PNG), what MSDDAPipeline samples at those weights and that seed; a bad setting must show its message
in the page and keep the last images. Run with ``pytest -m browser``; skipped without /usr/bin/chromium or the
studio extra.
"""

from __future__ import annotations

import io
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from msdda.testing import random_world_adapter

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""Without the background-networking flags Chromium keeps trying to reach its services from a closed network."""
STEPS = 2
PROMPT = "a red circle on the left"  # the page's default pickers
REWARDS = ["world-aesthetic", "world-consistency"]
TIMEOUT_MS = 180_000  # a render takes well under a second on an idle 2-core machine, far longer on a loaded one


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("browser_adapters")
    return [str(random_world_adapter(root / name, seed, num_inference_steps=STEPS)) for name, seed in
            (("a", 1), ("b", 2))]


@pytest.fixture(scope="module")
def served(adapters):
    """The studio's page on a free loopback port, in this process; its URL."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is absent: install the studio extra")
    pytest.importorskip("gradio", reason="gradio is absent: install the studio extra")
    from msdda.studio.app import build_app, serve
    from msdda.studio.core import Studio

    app = build_app(Studio.load("world", adapters, rewards=REWARDS, device="cpu"))
    url = serve(app, "127.0.0.1", _free_port())
    yield url
    app.close()


def _grid(page) -> list[np.ndarray]:
    from PIL import Image

    sources = page.eval_on_selector_all("#studio-grid img", "images => images.map(image => image.src)")
    assert len(sources) == 4
    return [np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(source).read())).convert("RGB"))
            for source in sources]


def _set_slider(page, elem_id: str, value: float) -> None:
    """Type the value into the slider's number box and leave it: Gradio fires the slider's release on blur, as
    it does on letting go of the handle."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def _sources(page) -> list[str]:
    return page.eval_on_selector_all("#studio-grid img", "images => images.map(image => image.src)")


def test_moving_a_slider_shows_the_pipelines_samples_at_the_new_weights(served, adapters, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    from msdda.fuse import MSDDAPipeline
    from msdda.studio.core import format_kl

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(served)
            page.wait_for_function("document.querySelectorAll('#studio-grid img').length == 4")
            before, sources = _grid(page), _sources(page)

            _set_slider(page, "weight-0", 1.2)
            page.wait_for_function("old => { const now = [...document.querySelectorAll('#studio-grid img')]"
                                   ".map(i => i.src); return now.length == 4 && now.every((s, i) => s != old[i]); }",
                                   arg=sources)
            after, sources = _grid(page), _sources(page)
            # the grid shows first, its path KLs a moment later (the second event)
            page.wait_for_function("() => { const text = document.querySelector('#studio-scores').innerText; "
                                   "return text.includes('path KL to base') && !text.includes('…'); }")
            kl_row = next(line for line in page.locator("#studio-scores").inner_text().splitlines()
                          if line.startswith("path KL to base"))

            _set_slider(page, "weight-0", 0)
            page.wait_for_function("old => [...document.querySelectorAll('#studio-grid img')].map(i => i.src)"
                                   ".some((s, i) => s != old[i])", arg=sources)
            sources = _sources(page)
            _set_slider(page, "weight-1", 0)
            page.locator("#studio-message").get_by_text("all zero").wait_for()
            assert _sources(page) == sources  # the last images stay
            screenshot = tmp_path / "studio.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    pipeline = MSDDAPipeline.from_pretrained("world", adapters=adapters)
    pipeline.set_progress_bar_config(disable=True)
    expected = [np.asarray(pipeline([PROMPT] * 4, weights=weights, num_inference_steps=STEPS, guidance_scale=3.0,
                                    generator=torch.Generator().manual_seed(0)).images[i]) for weights in
                ([0.5, 0.5], [1.2, 0.5]) for i in range(4)]
    assert [np.array_equal(a, b) for a, b in zip(before + after, expected)] == [True] * 8
    assert not any(np.array_equal(a, b) for a, b in zip(before, after))
    kl = pipeline([PROMPT] * 4, weights=[1.2, 0.5], num_inference_steps=STEPS, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt", return_kl=True).kl_to_base
    assert kl_row.split()[4:] == [format_kl(value) for value in kl.tolist()]  # after "path KL to base"
    print(f"studio screenshot: {screenshot}")
