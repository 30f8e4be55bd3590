"""``denseseg serve``'s HTTP API through FastAPI's test client: every route, the answers checked
against ``Segmenter.predict`` on the same image, and every kind of bad request answered with a
4xx and a JSON error while the server stays healthy."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from denseseg.data.io import read_image_bytes  # noqa: E402
from denseseg.inference.segmenter import Segmenter  # noqa: E402
from denseseg.models import create_model  # noqa: E402
from denseseg.serve.app import create_app  # noqa: E402
from denseseg.serve.batcher import Batcher, QueueFull  # noqa: E402
from denseseg.serve.encode import rle_encode  # noqa: E402
from denseseg.serve.settings import ServeSettings  # noqa: E402

CLASSES = ["background", "thing", "stuff"]
PALETTE = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]


def _segmenter(**kwargs) -> Segmenter:
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=4, depth=2)
    with torch.no_grad():  # untrained but varied labels
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.weight.uniform_(0.5, 1.5)
    return Segmenter(
        model.eval(),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        class_names=CLASSES,
        palette=PALETTE,
        device="cpu",
        **kwargs,
    )


def _client(settings: ServeSettings | None = None, **kwargs) -> TestClient:
    return TestClient(create_app(_segmenter(**kwargs), settings or ServeSettings()))


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(_segmenter(crop_size=32), ServeSettings(model_name="tiny"))) as c:
        yield c


def _png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _image(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _labels_of(response) -> np.ndarray:
    img = Image.open(io.BytesIO(response.content))
    assert img.mode == "P"
    return np.asarray(img)


def _expected(data: bytes, **options) -> np.ndarray:
    seg = _segmenter().with_options(**options) if options else _segmenter()
    return seg.predict(read_image_bytes(data)).numpy()


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


# ------------------------------------------------------------------ what a good request gets
def test_models_describes_the_model(client) -> None:
    info = client.get("/v1/models").json()["models"][0]
    assert info["name"] == "tiny"
    assert info["classes"] == CLASSES and info["palette"] == PALETTE
    assert info["in_channels"] == 3
    assert info["defaults"] == {"mode": "whole", "tta": "none"}
    assert info["modes"] == ["whole", "slide"]  # a window was given; no overlap tiles
    assert client.get("/healthz").json()["status"] == "ok"


def test_label_png_is_the_segmenters_answer(client) -> None:
    data = _png(_image())
    r = client.post("/v1/segment", files={"file": ("a.png", data, "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert float(r.headers["x-inference-ms"]) >= 0
    labels = _labels_of(r)
    assert labels.shape == (40, 56)
    np.testing.assert_array_equal(labels, _expected(data))
    palette = Image.open(io.BytesIO(r.content)).getpalette()[:9]
    assert palette == [v for c in PALETTE for v in c]
    raw = client.post("/v1/segment", content=data)  # the raw body: the same answer
    np.testing.assert_array_equal(_labels_of(raw), labels)


def test_options_reach_the_segmenter(client) -> None:
    data = _png(_image(64, 80, seed=3))
    for query, options in [("tta=hflip", {"tta": "hflip"}), ("mode=slide", {"mode": "slide"})]:
        r = client.post(f"/v1/segment?{query}", content=data)
        want = _segmenter(crop_size=32).with_options(**options).predict(read_image_bytes(data))
        np.testing.assert_array_equal(_labels_of(r), want.numpy())


def test_overlay_is_an_rgb_png_of_the_image_size(client) -> None:
    data = _png(_image())
    r = client.post("/v1/segment?format=overlay&alpha=1", content=data)
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "RGB" and img.size == (56, 40)
    colours = np.asarray(PALETTE, dtype=np.uint8)[_expected(data)]
    np.testing.assert_array_equal(np.asarray(img), colours)  # alpha 1: the label colours


def test_json_counts_fractions_and_coco_rle(client) -> None:
    data = _png(_image())
    body = client.post("/v1/segment?format=json", content=data).json()
    labels = _expected(data)
    assert (body["width"], body["height"], body["model"]) == (56, 40, "tiny")
    assert sum(c["pixels"] for c in body["classes"]) == labels.size
    for c in body["classes"]:
        assert c["pixels"] == int((labels == c["index"]).sum())
        assert c["fraction"] == pytest.approx(c["pixels"] / labels.size)
        assert c["color"] == PALETTE[c["index"]] and c["name"] == CLASSES[c["index"]]
        assert (c["rle"] is None) == (c["pixels"] == 0)
        if c["rle"] is not None:
            assert c["rle"] == rle_encode(labels == c["index"])


@pytest.mark.parametrize("seed", range(4))
def test_rle_matches_pycocotools(seed: int) -> None:
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(1, 300, 2))
    mask = rng.random((h, w)) < rng.random()
    if seed % 2:  # long runs: counts of several 5-bit groups, negative differences
        mask = np.zeros((h, w), bool)
        mask[rng.integers(0, h) :, rng.integers(0, w) :] = True
    want = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    ours = rle_encode(mask)
    assert ours == {"size": list(want["size"]), "counts": want["counts"].decode()}
    np.testing.assert_array_equal(mask_api.decode({**want}), mask)


def test_batch_endpoint_matches_single_images(client) -> None:
    datas = [_png(_image(40, 56, seed=s)) for s in range(3)] + [_png(_image(24, 30, seed=9))]
    files = [("files", (f"im{i}.png", d, "image/png")) for i, d in enumerate(datas)]
    r = client.post("/v1/segment/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == ["im0.png", "im1.png", "im2.png", "im3.png"]
    for item, data in zip(results, datas, strict=True):
        png = base64.b64decode(item["png_base64"])
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), _expected(data))
    as_json = client.post("/v1/segment/batch?format=json", files=files[:2]).json()
    assert [x["width"] for x in as_json["results"]] == [56, 56]


def test_metrics_count_requests(client) -> None:
    client.get("/healthz")
    text = client.get("/metrics").text
    assert 'denseseg_requests_total{route="/healthz",status="200"}' in text
    assert "denseseg_queue_length" in text and "denseseg_request_seconds_bucket" in text


def test_openapi_lists_the_routes(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/segment", "/v1/segment/batch", "/v1/models", "/healthz"} <= set(paths)
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------ image kinds
def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_image()).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind",
    ["gray", "gray16", "palette", "rgba", "cmyk_jpeg", "cmyk_tiff", "bilevel"],
)
def test_image_modes_are_handled(client, kind: str) -> None:
    rgb = _image()
    data = {
        "gray": lambda: _png(rgb[..., 0]),
        "gray16": lambda: _png(rgb[..., 0].astype(np.uint16) * 257),
        "palette": lambda: _png(rgb, format="GIF"),
        "rgba": lambda: _png(np.dstack([rgb, rgb[..., :1]])),
        "cmyk_jpeg": _cmyk_jpeg,
        "cmyk_tiff": lambda: _tiff(Image.fromarray(rgb).convert("CMYK")),
        "bilevel": lambda: _tiff(Image.fromarray(rgb[..., 0] > 128)),
    }[kind]()
    r = client.post("/v1/segment", content=data)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(_labels_of(r), _expected(data))


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF")
    return buf.getvalue()


# ------------------------------------------------------------------ bad requests
def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width x height`` pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"", 400, "bad_image"),
        (b"name,value\n1,2\n", 415, "not_an_image"),
        (_png(_image())[:200], 400, "bad_image"),
        (_huge_png_header(100_000, 100_000), 413, "too_many_pixels"),
        (b"%PDF-1.4\n" + b"x" * 100, 415, "not_an_image"),
    ],
    ids=["empty", "text", "truncated_png", "bomb_100000x100000", "pdf"],
)
def test_bad_images_get_a_4xx_and_the_server_stays_healthy(client, body, status, code) -> None:
    message = _error(client.post("/v1/segment", content=body), status, code)
    assert "\n" not in message and len(message) < 400
    as_form = client.post("/v1/segment", files={"file": ("x.png", body, "image/png")})
    _error(as_form, status, code)
    assert client.get("/healthz").status_code == 200
    good = client.post("/v1/segment", content=_png(_image()))
    assert good.status_code == 200


def test_a_format_outside_the_accepted_ones_is_refused(client) -> None:
    buf = io.BytesIO()
    Image.fromarray(_image()).save(buf, format="ICO")
    message = _error(client.post("/v1/segment", content=buf.getvalue()), 415, "not_an_image")
    assert "ICO" in message


def test_wrong_form_field_and_options(client) -> None:
    data = _png(_image())
    msg = _error(client.post("/v1/segment", files={"image": ("a.png", data)}), 400, "wrong_field")
    assert "'image'" in msg and "'file'" in msg
    both = {"file": ("a.png", data), "files": ("b.png", data)}
    _error(client.post("/v1/segment", files=both), 400, "wrong_field")
    _error(client.post("/v1/segment", files={"file": (None, "not a file")}), 400, "no_file")
    _error(client.post("/v1/segment", data={"file": "a form"}), 415, "not_an_image")
    msg = _error(client.post("/v1/segment?colour=red", content=data), 400, "unknown_option")
    assert "colour" in msg
    for query in ("format=jpeg", "mode=overlap_tile", "tta=rot", "alpha=2", "alpha=x"):
        _error(client.post(f"/v1/segment?{query}", content=data), 400, "invalid_option")
    _error(client.post("/v1/segment/batch", content=data), 400, "no_file")
    _error(client.get("/v1/samples/nope.png"), 404, "not_found")
    _error(client.get("/v1/nothing"), 404, "not_found")
    _error(client.get("/v1/segment"), 405, "method_not_allowed")


def test_upload_size_limit() -> None:
    with _client(ServeSettings(max_upload_bytes=1000)) as c:
        big = _png(_image(64, 64))
        assert len(big) > 1000
        _error(c.post("/v1/segment", content=big), 413, "too_large")
        _error(c.post("/v1/segment", files={"file": ("a.png", big)}), 413, "too_large")

        def chunked():  # no Content-Length: counted while read
            yield big[:600]
            yield big[600:]

        _error(c.post("/v1/segment", content=chunked()), 413, "too_large")
        assert c.get("/healthz").status_code == 200


def test_pixel_limit_is_the_servers() -> None:
    with _client(ServeSettings(max_pixels=1000)) as c:
        message = _error(
            c.post("/v1/segment", content=_png(_image(40, 56))), 413, "too_many_pixels"
        )
        assert "1,000" in message and "DENSESEG_MAX_PIXELS" not in message


def test_too_many_files() -> None:
    with _client(ServeSettings(max_files=2)) as c:
        data = _png(_image(16, 16))
        files = [("files", (f"{i}.png", data)) for i in range(3)]
        _error(c.post("/v1/segment/batch", files=files), 400, "too_many_files")


# ------------------------------------------------------------------ token and origins
def test_token_guards_the_api_not_the_page_or_health() -> None:
    with _client(ServeSettings(token="s3cret")) as c:
        data = _png(_image())
        msg = _error(c.post("/v1/segment", content=data), 401, "unauthorized")
        assert "no token" in msg
        wrong = c.post("/v1/segment", content=data, headers={"Authorization": "Bearer nope"})
        assert "wrong token" in _error(wrong, 401, "unauthorized")
        _error(c.get("/v1/models"), 401, "unauthorized")
        _error(c.get("/metrics"), 401, "unauthorized")
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/v1/segment", content=data, headers=ok).status_code == 200
        assert c.get("/metrics", headers=ok).status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.get("/openapi.json").status_code == 200


def test_cross_origin_requests_are_refused_unless_allowed() -> None:
    data = _png(_image())
    evil = {"Origin": "https://evil.example"}
    with _client() as c:
        _error(c.post("/v1/segment", content=data, headers=evil), 403, "cross_origin")
        same = {"Origin": "http://testserver"}  # the page itself
        assert c.post("/v1/segment", content=data, headers=same).status_code == 200
    allowed = {"Origin": "https://app.example"}
    with _client(ServeSettings(cors_origins=("https://app.example",))) as c:
        r = c.post("/v1/segment", content=data, headers=allowed)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        pre = c.options(
            "/v1/segment",
            headers={**allowed, "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 200
        _error(c.post("/v1/segment", content=data, headers=evil), 403, "cross_origin")


# ------------------------------------------------------------------ load
class _Slow(nn.Module):
    """A model that holds the inference thread until released (or ``delay`` passes)."""

    def __init__(self, delay: float = 5.0) -> None:
        super().__init__()
        self.num_classes, self.in_channels = 2, 3
        self.release, self.delay = threading.Event(), delay
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.release.wait(self.delay)
        return {"out": self.conv(x)}


def test_timeout_gives_504_and_the_server_recovers() -> None:
    slow = _Slow(delay=1.0)
    seg = Segmenter(slow, mean=[0.5] * 3, std=[0.5] * 3, device="cpu")
    with TestClient(create_app(seg, ServeSettings(timeout_s=0.2))) as c:
        start = time.monotonic()
        _error(c.post("/v1/segment", content=_png(_image(8, 8))), 504, "timeout")
        assert time.monotonic() - start < 0.9
        slow.release.set()
        assert c.post("/v1/segment", content=_png(_image(8, 8))).status_code == 200


def test_full_server_answers_503_with_retry_after() -> None:
    slow = _Slow()
    seg = Segmenter(slow, mean=[0.5] * 3, std=[0.5] * 3, device="cpu")
    app = create_app(seg, ServeSettings(max_queue=2, max_batch=1))
    data = _png(_image(8, 8))
    with TestClient(app) as c:
        answers: list[int] = []
        threads = [
            threading.Thread(target=lambda: answers.append(c.post("/v1/segment", content=data)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while app.state.denseseg.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/segment", content=data)
        _error(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
        slow.release.set()
        for t in threads:
            t.join(10)
        assert [a.status_code for a in answers] == [200, 200]
        assert c.get("/healthz").json()["queue"] == 0


def test_batcher_batches_same_key_jobs_within_the_window() -> None:
    calls: list[tuple[str, int]] = []

    def predict(key, images, stop):
        calls.append((key, len(images)))
        return [int(im.sum()) for im in images]

    async def run() -> list[int]:
        batcher = Batcher(predict, max_batch=4, wait_s=0.2, max_queue=8)
        try:
            jobs = [batcher.submit("a", torch.full((1,), i), 5) for i in range(5)]
            jobs.append(batcher.submit("b", torch.full((1,), 9), 5))
            return await asyncio.gather(*jobs)
        finally:
            batcher.close()

    assert asyncio.run(run()) == [0, 1, 2, 3, 4, 9]
    assert sorted(calls) == [("a", 1), ("a", 4), ("b", 1)]


def test_batcher_refuses_beyond_its_queue_and_reports_errors() -> None:
    gate = threading.Event()

    def predict(key, images, stop):
        gate.wait(5)
        if key == "bad":
            raise ValueError("broken")
        return list(images)

    async def run() -> None:
        batcher = Batcher(predict, max_batch=1, wait_s=0, max_queue=1)
        try:
            first = asyncio.ensure_future(batcher.submit("bad", torch.zeros(1), 5))
            await asyncio.sleep(0.1)  # the thread took it: the queue is empty again
            second = asyncio.ensure_future(batcher.submit("ok", torch.zeros(1), 5))
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFull):
                await batcher.submit("ok", torch.zeros(1), 5)
            gate.set()
            with pytest.raises(ValueError, match="broken"):
                await first
            assert (await second).shape == (1,)
        finally:
            batcher.close()

    asyncio.run(run())


def test_concurrent_requests_share_forward_passes() -> None:
    app = create_app(_segmenter(), ServeSettings(max_batch=4, batch_wait_ms=200))
    datas = [_png(_image(40, 56, seed=s)) for s in range(4)]
    with TestClient(app) as c:
        out: dict[int, np.ndarray] = {}

        def send(i: int) -> None:
            out[i] = _labels_of(c.post("/v1/segment", content=datas[i]))

        threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        text = c.get("/metrics").text
    for i, data in enumerate(datas):  # batched or not, each image gets its own answer
        np.testing.assert_array_equal(out[i], _expected(data))
    count = float(text.split("denseseg_batch_images_count ")[1].split()[0])
    assert count < 4, "four requests within the window should share forward passes"


def test_an_instance_model_is_refused_in_one_line() -> None:
    from denseseg.errors import ConfigError

    with pytest.raises(ConfigError, match="semantic"):
        create_app(object(), ServeSettings())  # type: ignore[arg-type]


def test_settings_are_checked() -> None:
    from denseseg.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-batch"):
        ServeSettings(max_batch=0)
    with pytest.raises(ConfigError, match="--cors-origin"):
        ServeSettings(cors_origins=("example.org",))
    with pytest.raises(ConfigError, match="--timeout"):
        ServeSettings(timeout_s=0)
    assert json.loads(json.dumps(ServeSettings().__dict__, default=list))["max_batch"] is None
    with TestClient(create_app(_segmenter(), ServeSettings())) as c:  # on the CPU: one image
        assert c.app.state.denseseg.batcher.max_batch == 1


# ------------------------------------------------------------------ the command line
def _start_server(args: list[str], tmp_path):
    import subprocess
    import sys

    from conftest import save_em_checkpoint

    ckpt = save_em_checkpoint(tmp_path / "em.pt", "unet", base_channels=4, depth=2)
    cmd = [sys.executable, "-m", "denseseg", "serve", "--model", str(ckpt), "--port", "0", *args]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.startswith("denseseg: serving em at http://127.0.0.1:"), line + proc.stderr.read()
    return proc, line.split(" at ")[1].split(",")[0].strip()


def _wait_healthy(url: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                assert json.load(r)["status"] == "ok"
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _post_image(url: str, data: bytes) -> np.ndarray:
    import urllib.request

    req = urllib.request.Request(f"{url}/v1/segment", data=data, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())))


def _stop(proc) -> str:
    import signal

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    return err


def test_denseseg_serve_answers_and_stops_cleanly(tmp_path) -> None:
    proc, url = _start_server([], tmp_path)
    try:
        _wait_healthy(url)
        labels = _post_image(url, _png(_image(20, 24)[..., 0]))
        assert labels.shape == (20, 24) and set(np.unique(labels)) <= {0, 1}
    finally:
        if proc.poll() is None:
            _stop(proc)


@pytest.mark.slow
@pytest.mark.heavy  # make test-all: keeps make test under 15 minutes
def test_workers_serve_from_several_processes(tmp_path) -> None:
    proc, url = _start_server(["--workers", "2"], tmp_path)
    try:
        _wait_healthy(url)
        for _ in range(4):
            assert _post_image(url, _png(_image(16, 16)[..., 0])).shape == (16, 16)
    finally:
        if proc.poll() is None:
            _stop(proc)


def test_a_busy_port_is_one_line(tmp_path, capsys) -> None:
    import socket

    from conftest import save_em_checkpoint
    from denseseg.cli import main

    ckpt = save_em_checkpoint(tmp_path / "em.pt", "unet", base_channels=4, depth=2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["serve", "--model", str(ckpt), "--port", str(port), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"denseseg: error: cannot listen on 127.0.0.1:{port}"), err
    assert err.count("\n") == 1


def test_without_the_extra_serve_names_it(monkeypatch, capsys) -> None:
    import importlib.util

    from denseseg.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "uvicorn" else real(n, *a)
    )
    assert main(["serve", "--model", "camvid"]) == 2
    err = capsys.readouterr().err
    assert "denseseg[serve]" in err and "uvicorn" in err and err.count("\n") == 1


def test_a_loopback_server_answers_only_to_loopback_names() -> None:
    """DNS rebinding: a page on evil.example makes its name point at 127.0.0.1; the browser
    then sends ``Host: evil.example:8000``, which a server on a loopback address refuses."""
    from denseseg.cli import _loopback_names

    assert _loopback_names("0.0.0.0") == ()
    hosts = _loopback_names("127.0.0.1")
    assert {"localhost", "127.0.0.1", "::1"} <= set(hosts)
    with _client(ServeSettings(allowed_hosts=hosts)) as c:
        data = _png(_image())
        rebound = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
        msg = _error(c.post("/v1/segment", content=data, headers=rebound), 400, "invalid_host")
        assert "evil.example" in msg
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"):
            r = c.post("/v1/segment", content=data, headers={"Host": host})
            assert r.status_code == 200, (host, r.text)


@pytest.mark.slow
@pytest.mark.heavy  # make test-all: keeps make test under 15 minutes
def test_an_exported_onnx_file_is_served_with_the_same_answers(tmp_path) -> None:
    """The server over another backend: an ONNX export of the model, run by ONNX Runtime,
    answers as the torch model does."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from denseseg.inference.export import export_model, segmenter_meta
    from denseseg.inference.onnx_backends import load_onnx

    seg = _segmenter()
    path = export_model(seg.model, segmenter_meta(seg), tmp_path / "tiny.onnx")
    served = load_onnx(path, device="cpu")
    assert served.backend == "onnxruntime"
    data = _png(_image(40, 56, seed=5))
    with TestClient(create_app(served, ServeSettings(model_name="tiny-onnx"))) as c:
        info = c.get("/v1/models").json()["models"][0]
        assert info["backend"] == "onnxruntime" and info["classes"] == CLASSES
        labels = _labels_of(c.post("/v1/segment", content=data))
        hflip = _labels_of(c.post("/v1/segment?tta=hflip", content=data))
    want = seg.predict(read_image_bytes(data)).numpy()
    assert (labels == want).mean() >= 0.999
    assert hflip.shape == want.shape
