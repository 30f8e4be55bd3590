"""The web page of ``denseseg serve`` and its sample images.

* The samples: names, PNGs that decode, the same bytes on every call.
* ``GET /``: a self-contained HTML page (nothing loaded from another host).
* End to end in a real browser (Debian's chromium through Playwright, skipped with the reason
  when either is missing): a server on a free port with the built-in ``camvid`` model, an image
  uploaded, a sample clicked and a file dropped; the overlay, legend, area table and hover text
  are checked against the predictor's own labels; errors and the token prompt are shown.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from denseseg.data.sample_scenes import sample_names, sample_png


def test_sample_names_are_url_safe_and_unique() -> None:
    names = sample_names()
    assert len(names) >= 3 and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9-]+", n) for n in names)
    assert any(n.startswith("shapes") for n in names) and any(n.startswith("street") for n in names)


@pytest.mark.parametrize("name", sample_names())
def test_sample_is_an_rgb_png(name: str) -> None:
    img = Image.open(io.BytesIO(sample_png(name)))
    assert img.format == "PNG" and img.mode == "RGB"
    size = (64, 64) if name.startswith("shapes") else (480, 360)
    assert img.size == size
    pixels = np.asarray(img)
    assert pixels.std() > 10  # a picture, not a flat fill


def test_samples_are_deterministic_and_cached() -> None:
    from denseseg.data import sample_scenes as samples

    first = {n: sample_png(n) for n in sample_names()}
    samples.sample_png.cache_clear()
    start = time.perf_counter()
    again = {n: sample_png(n) for n in sample_names()}
    assert again == first  # drawn again from the seeds: the same bytes
    assert time.perf_counter() - start < 0.3 * len(first)
    assert sample_png(sample_names()[0]) is sample_png(sample_names()[0])
    assert len(set(first.values())) == len(first)


def test_unknown_sample_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        sample_png("no-such-sample")


# ----------------------------------------------------------------------------------------------
# The page, over the application


@pytest.fixture(scope="module")
def camvid():
    """The built-in camvid Segmenter on the CPU (shared by the tests of this module)."""
    import denseseg

    return denseseg.load_model("camvid", device="cpu")


# What would load something from another host (or from anywhere: no <link>, no <script src>).
OUTSIDE_REFERENCES = (
    r"https?:",
    r"@import",
    r"<link\b",
    r"<script[^>]*\bsrc\b",
    r"\b(?:src|href|action|srcset)\s*=\s*[\"']?\s*//",
    r"url\(\s*[\"']?\s*(?:[a-z]+:)?//",
)


def test_page_is_self_contained(camvid) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from denseseg.serve.app import create_app

    with TestClient(create_app(camvid)) as client:
        response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert html.lstrip().lower().startswith("<!doctype html>")
    for pattern in OUTSIDE_REFERENCES:
        found = re.search(pattern, html, re.IGNORECASE)
        assert found is None, f"the page refers to another host: {found.group(0)!r}"
    for needed in (
        'id="file"',
        'id="drop"',
        'id="view"',
        'id="opacity"',
        'id="legend"',
        'id="hover-info"',
        'id="area-table"',
        'id="error"',
        '"sample"',
    ):
        assert needed in html


# ----------------------------------------------------------------------------------------------
# End to end in a browser


def _chromium() -> str:
    for candidate in (shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate:
            return candidate
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    pytest.skip("no chromium on PATH (install Debian's package: apt-get install chromium)")


class _Server:
    """A uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("multipart", reason="python-multipart is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = _chromium()
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=executable, headless=True)
        except sync_api.Error as exc:
            pytest.skip(f"chromium at {executable} does not start: {str(exc).splitlines()[0]}")
        yield browser
        browser.close()


@pytest.fixture
def page(browser, camvid):
    """A page of a fresh server; fails the test on a script error or an outside request."""
    from denseseg.serve.app import create_app
    from denseseg.serve.settings import ServeSettings

    with _Server(create_app(camvid, ServeSettings(model_name="camvid"))) as server:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(20_000)
        errors: list[str] = []
        outside: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        own = (server.url, "blob:", "data:")
        page.on("request", lambda r: r.url.startswith(own) or outside.append(r.url))
        page.goto(server.url + "/")
        yield page
        context.close()
    assert not errors, f"script errors on the page: {errors}"
    assert not outside, f"the page requested other hosts: {outside}"


def _labels(seg, png: bytes) -> np.ndarray:
    rgb = np.array(Image.open(io.BytesIO(png)).convert("RGB"))
    labels, _ = seg.predict_batch([torch.from_numpy(rgb).permute(2, 0, 1).contiguous()])
    return labels[0].numpy()


def _wait_for_result(page, name: str) -> None:
    page.wait_for_function(
        "n => document.getElementById('status').textContent.startsWith(n + ':')", arg=name
    )
    page.wait_for_selector("#area-table tbody tr")
    assert not page.locator("#busy").is_visible()


def _canvas(page) -> np.ndarray:
    """The canvas pixels as an ``(H, W, 3)`` array."""
    url = page.evaluate("() => document.getElementById('view').toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.array(Image.open(io.BytesIO(png)).convert("RGB"))


def _set_opacity(page, percent: int) -> None:
    page.evaluate(
        """p => { const s = document.getElementById('opacity'); s.value = p;
        s.dispatchEvent(new Event('input', {bubbles: true})); }""",
        percent,
    )


def _hover(page, x: int, y: int, size: tuple[int, int]) -> str:
    box = page.locator("#view").bounding_box()
    page.mouse.move(
        box["x"] + (x + 0.5) * box["width"] / size[0],
        box["y"] + (y + 0.5) * box["height"] / size[1],
    )
    return page.locator("#hover-info").inner_text()


def _check_overlay(page, seg, png: bytes, labels: np.ndarray) -> None:
    """Opacity 100%: the label colours; 0%: the picture itself; 50%: between, not blank."""
    original = np.array(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    palette = np.array(seg.palette, dtype=int)
    for percent, expected, tolerance in (
        (100, palette[labels], 1),
        (0, original, 1),
        (50, (original + palette[labels]) / 2, 2),
    ):
        _set_opacity(page, percent)
        shown = _canvas(page).astype(int)
        off = int(np.abs(shown - expected).max())
        assert off <= tolerance, f"opacity {percent}%: the canvas is off by up to {off}"
    assert len(np.unique(shown.reshape(-1, 3), axis=0)) > 100  # not a blank canvas


def _check_tables(page, seg, labels: np.ndarray) -> None:
    counts = np.bincount(labels.ravel(), minlength=len(seg.class_names))
    assert page.locator("#legend li").all_inner_texts() == list(seg.class_names)
    rows = page.locator("#area-table tbody tr").all_inner_texts()
    got = {r.split("\t")[0]: int(r.split("\t")[1].replace(",", "")) for r in rows}
    assert got == {seg.class_names[k]: int(n) for k, n in enumerate(counts) if n}
    assert abs(sum(float(r.split("\t")[2]) for r in rows) - 100) < 0.5


def test_page_segments_an_upload_in_a_browser(page, camvid, tmp_path: Path) -> None:
    png = sample_png("street-1")
    (tmp_path / "street.png").write_bytes(png)
    labels = _labels(camvid, png)
    page.wait_for_selector("#legend li")
    page.wait_for_selector("button.sample[data-name='street-2']")
    page.set_input_files("#file", str(tmp_path / "street.png"))
    _wait_for_result(page, "street.png")
    _check_overlay(page, camvid, png, labels)
    _check_tables(page, camvid, labels)
    h, w = labels.shape
    for x, y in ((w // 2, 5), (w // 2, h - 5), (40, 120), (w - 50, 200)):
        expected = camvid.class_names[labels[y, x]]
        assert _hover(page, x, y, (w, h)) == f"{expected} at x {x}, y {y}"
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    assert Image.open(shot).size[0] == 1280


def test_page_samples_drop_and_errors(page, camvid) -> None:
    page.click("button.sample[data-name='shapes-1']")
    _wait_for_result(page, "shapes-1.png")
    _check_tables(page, camvid, _labels(camvid, sample_png("shapes-1")))
    # A dropped file goes the same way as a chosen one.
    page.evaluate(
        """async () => { const blob = await (await fetch('/v1/samples/street-2.png')).blob();
        const dt = new DataTransfer(); dt.items.add(new File([blob], 'dropped.png'));
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); }"""
    )
    _wait_for_result(page, "dropped.png")
    _check_tables(page, camvid, _labels(camvid, sample_png("street-2")))
    assert not page.locator("#error").is_visible()
    # Not an image: the server's one-line message is shown, the last result stays.
    page.set_input_files(
        "#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}]
    )
    page.wait_for_selector("#error.on")
    assert "image" in page.locator("#error").inner_text().lower()
    assert not page.locator("#busy").is_visible()


def test_page_asks_for_the_token(browser, camvid) -> None:
    from denseseg.serve.app import create_app
    from denseseg.serve.settings import ServeSettings

    app = create_app(camvid, ServeSettings(model_name="camvid", token="s3cret"))
    with _Server(app) as server:
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(server.url + "/")
        page.wait_for_selector("#token-form.on")
        page.fill("#token", "wrong")
        page.click("#token-form button")
        page.wait_for_selector("#error.on")
        page.fill("#token", "s3cret")
        page.click("#token-form button")
        page.wait_for_selector("button.sample[data-name='shapes-2']")
        assert not page.locator("#token-form").is_visible()
        assert not page.locator("#error").is_visible()
        page.reload()  # the token is kept for the session
        page.wait_for_selector("#legend li")
        page.click("button.sample[data-name='shapes-2']")
        _wait_for_result(page, "shapes-2.png")
        context.close()
