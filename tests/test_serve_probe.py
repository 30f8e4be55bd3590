"""Hostile requests against ``denseseg serve``: each test pins a bug found by probing the server
(it fails until the bug is fixed; the docstring says what is right) or a hostile case that
already works and that ``tests/test_serve_api.py`` does not cover."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient  # noqa: E402

from denseseg.errors import ConfigError  # noqa: E402
from denseseg.inference.segmenter import Segmenter  # noqa: E402
from denseseg.models import create_model  # noqa: E402
from denseseg.serve.app import create_app  # noqa: E402
from denseseg.serve.settings import ServeSettings  # noqa: E402

CLASSES = ["background", "thing", "stuff"]
PALETTE = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
TOKEN = "s3cret"
ALLOWED = "https://app.example"


def _segmenter(in_channels: int = 3, **kwargs) -> Segmenter:
    torch.manual_seed(0)
    model = create_model("unet", num_classes=3, base_channels=4, depth=2, in_channels=in_channels)
    return Segmenter(
        model.eval(),
        mean=[0.5] * in_channels,
        std=[0.25] * in_channels,
        class_names=CLASSES,
        palette=PALETTE,
        device="cpu",
        **kwargs,
    )


def _client(settings: ServeSettings | None = None, **kwargs) -> TestClient:
    app = create_app(_segmenter(**kwargs), settings or ServeSettings())
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client():
    with _client(crop_size=32) as c:
        yield c


def _encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **save) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def _image(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _error(response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_with(before_idat: bytes = b"", w: int = 8, h: int = 8, bits: int = 8) -> bytes:
    """An RGB PNG (``bits`` per sample) with extra chunks before its pixel data."""
    row = b"\0" + b"\x80" * (w * 3 * bits // 8)
    ihdr = struct.pack(">IIBBBBB", w, h, bits, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + before_idat
        + _chunk(b"IDAT", zlib.compress(row * h))
        + _chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------ bugs: crashes (500s)
@pytest.mark.parametrize(
    "body",
    [
        _png_with(_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 2**21, 9))),
        _png_with(_chunk(b"iCCP", b"p\0\0" + zlib.compress(b"a" * 2**21, 9))),
        _png_with(_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 10**6, 9)) * 80),
        b"P6\n4 4\nV55\n" + bytes(48),
    ],
    ids=["png_ztxt_2MiB", "png_iccp_2MiB", "png_80_ztxt_chunks", "ppm_bad_maxval"],
)
def test_header_chunks_pillow_refuses_are_a_4xx_not_a_500(client, body) -> None:
    """BUG: Pillow raises ValueError while *opening* these (text/ICC chunk over
    MAX_TEXT_CHUNK / MAX_TEXT_MEMORY, a PPM header that is not a number); ``data.io._open``
    catches only UnidentifiedImageError and OSError, so the server answers 500 with a traceback
    in its log. Right: 400 ``bad_image`` (the same chunk after IDAT already gets that)."""
    r = client.post("/v1/segment", content=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_image"
    assert client.get("/healthz").status_code == 200


def test_a_client_that_disconnects_mid_upload_is_not_an_internal_error(caplog) -> None:
    """BUG: ``_read_body`` lets starlette's ClientDisconnect escape: the app logs "unexpected
    error" with a traceback, answers 500 and uvicorn logs a second traceback ("Exception in
    ASGI application") for every client that gives up during an upload. Right: a quiet end
    (no ERROR log, no exception out of the application)."""
    app = create_app(_segmenter(), ServeSettings())
    messages = [{"type": "http.request", "body": b"\x89PNG\r\n", "more_body": True}]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/segment",
        "raw_path": b"/v1/segment",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-length", b"1000")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(_: dict) -> None:
        return None

    try:
        with caplog.at_level(logging.ERROR):
            asyncio.run(app(scope, receive, send))
    finally:
        app.state.denseseg.batcher.close()
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text


# ------------------------------------------------------------------ bugs: limits bypassed
def _jpeg_with_extra_scans(side: int, extra: int) -> bytes:
    """A ``side`` x ``side`` progressive gray JPEG (a few kB) whose last scan is repeated
    ``extra`` times: every scan makes libjpeg walk the whole image again."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=50)
    data, segments, i = buf.getvalue(), [], 2
    while data[i + 1] != 0xD9:
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        end = i + 2 + length
        if data[i + 1] == 0xDA:  # a scan: its entropy-coded data runs to the next marker
            while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
        segments.append(data[i:end])
        i = end
    return data[:2] + b"".join(segments) + segments[-1] * extra + b"\xff\xd9"


def test_a_jpeg_scan_bomb_is_refused_before_decoding() -> None:
    """BUG (CPU): a progressive JPEG may repeat scans without limit and libjpeg walks the whole
    image for each: 2000 scans of a 4096x4096 image are a 130 kB upload and ~50 s of CPU (a
    20 MB upload: hours), decoded before the request's timeout even starts, so the request is
    not answered 504 either. Right: ``read_image_bytes`` counts the SOS markers (cheap, before
    decoding, as ``djpeg -maxscans`` does) and refuses absurd counts (say > 100; real files have
    about 10) with a DataError, in well under the time decoding would take."""
    from denseseg.data.io import read_image_bytes
    from denseseg.errors import DataError

    body = _jpeg_with_extra_scans(2048, 400)  # ~3 s to decode on a laptop core
    start = time.monotonic()
    with pytest.raises(DataError):
        read_image_bytes(body, "upload", 4096 * 4096, {"JPEG"})
    assert time.monotonic() - start < 1


_TIFF_TILE_PROBE = """
import resource, struct, sys, zlib
from denseseg.data.io import read_image_bytes
from denseseg.errors import DataError
tile = int(sys.argv[1])
data = zlib.compress(bytes(1000))
entries = sorted([(256, 4, 1, 16), (257, 4, 1, 16), (258, 3, 1, 8), (259, 3, 1, 8),
                  (262, 3, 1, 1), (277, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile),
                  (324, 4, 1, 122), (325, 4, 1, len(data))])
ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
tiff = (b"II*\\0" + struct.pack("<I", 8) + ifd + bytes(4)).ljust(122, b"\\0") + data
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_image_bytes(tiff, "upload", 10**6, {"TIFF"})
except DataError:
    pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_tiff_with_giant_tiles_does_not_allocate_hundreds_of_mb() -> None:
    """BUG (memory): a 16x16 deflate TIFF of ~150 bytes that declares 24576x24576 tiles makes
    libtiff allocate a ~600 MB tile buffer before failing (32768: ~1 GB); every admitted
    request decodes at once, so a few such uploads exhaust the machine. Right: check the tile
    (and strip) geometry against the image size/pixel limit from the header, before
    ``load()`` (in ``data.io.read_image_bytes``/``_decode``)."""
    out = subprocess.run(
        [sys.executable, "-c", _TIFF_TILE_PROBE, "24576"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    grew_mb = int(out.stdout.split()[-1])
    assert grew_mb < 200, f"decoding a 150-byte TIFF grew the process by {grew_mb} MB"


# ------------------------------------------------------------------ bugs: load and timeouts
def test_a_batch_larger_than_the_queue_is_not_busy_forever() -> None:
    """BUG: ``segment_batch`` submits every image of one admitted request to the batcher at
    once; with ``--max-queue 2`` a 4-image batch on an idle server is answered 503 "busy, retry
    in a second" every time (Retry-After can never help), and the images already queued are
    still computed for nobody. Right: a batch is one admitted request (200), or, if it cannot
    ever fit, a 4xx naming the limit, never 503."""
    data = _encode(_image(16, 16))
    files = [("files", (f"{i}.png", data, "image/png")) for i in range(4)]
    with _client(ServeSettings(max_queue=2, max_batch=1)) as c:
        r = c.post("/v1/segment/batch", files=files)
    assert r.status_code != 503, r.text
    if r.status_code != 200:
        _error(r, 400, "too_many_files")


def test_a_timed_out_job_does_not_keep_the_model_busy() -> None:
    """BUG: on timeout the request gets 504 but its work goes on: a 1x20000 image in slide mode
    (625 padded 32x32 windows for 20000 pixels; within the pixel limit a 1 x 16M image with a
    512 window is ~50000 windows, hours) holds the inference thread, and every later request
    is 504 until it ends. Right: a job whose requests all timed out stops between windows
    (the batcher passes a "cancelled" check to the Segmenter), so the next request is
    answered."""
    segmenter = _segmenter(crop_size=32)
    # Each forward pass takes at least 20 ms, so the 625 windows outlast the timeout on any
    # machine (a fast CI host ran the tiny U-Net's windows in under 0.5 s).
    segmenter.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    app = create_app(segmenter, ServeSettings(timeout_s=0.5))
    with TestClient(app, raise_server_exceptions=False) as c:
        long = c.post("/v1/segment?mode=slide", content=_encode(_image(1, 20000)))
        _error(long, 504, "timeout")
        time.sleep(0.2)
        after = c.post("/v1/segment", content=_encode(_image(8, 8)))
    assert after.status_code == 200, after.text


# ------------------------------------------------------------------ bugs: small contract gaps
def test_too_many_files_names_the_servers_limit() -> None:
    """BUG: the form parser is given ``max_files + 1`` so that 17 files get the app's own
    ``too_many_files``, but 18 or more get starlette's ``bad_request`` "Maximum number of files
    is 17" (the limit is 16). Right: ``too_many_files`` naming 16 for any count above it."""
    data = _encode(_image(8, 8))
    files = [("files", (f"{i}.png", data, "image/png")) for i in range(20)]
    with _client() as c:
        message = _error(c.post("/v1/segment/batch", files=files), 400, "too_many_files")
    assert "16" in message and "17" not in message


def test_a_401_to_an_allowed_origin_is_readable_by_its_page() -> None:
    """BUG: the token guard is the outermost middleware, so its 401 (and 403) never passes
    through CORSMiddleware: a page on an allowed origin with a missing or stale token sees a
    CORS failure instead of the JSON error. Right: the 401 carries
    ``Access-Control-Allow-Origin`` for an allowed origin (as the 415 from the route does)."""
    settings = ServeSettings(token=TOKEN, cors_origins=(ALLOWED,))
    with _client(settings) as c:
        r = c.get("/v1/models", headers={"Origin": ALLOWED})
    _error(r, 401, "unauthorized")
    assert r.headers.get("access-control-allow-origin") == ALLOWED


def test_a_non_ascii_token_either_works_or_is_refused_at_start() -> None:
    """BUG: ``--token pässwört`` starts a server no client can use: HTTP header bytes are
    decoded as latin-1, the setting is compared as UTF-8, so the right token (sent as UTF-8 by
    curl/requests) is 401. Right: refuse tokens outside printable ASCII in ServeSettings
    (ConfigError), or compare the raw header bytes."""
    try:
        settings = ServeSettings(token="pässwört")
    except ConfigError:
        return
    with _client(settings) as c:
        header = "Bearer pässwört".encode()
        assert c.get("/v1/models", headers={"Authorization": header}).status_code == 200


def _serve_command(args: list[str], tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    """Run ``denseseg serve`` in-process with uvicorn stubbed out (it returns at once)."""
    import uvicorn

    from conftest import save_em_checkpoint
    from denseseg.cli import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    ckpt = save_em_checkpoint(tmp_path / "em.pt", "unet", base_channels=4, depth=2)
    code = main(["serve", "--model", str(ckpt), "--device", "cpu", "--port", "0", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "70000"],
        ["--max-upload-mb", "0"],
        ["--max-upload-mb", "-1"],
        ["--max-upload-mb", "nan"],
        ["--max-upload-mb", "inf"],
        ["--batch-wait-ms", "nan"],
        ["--timeout", "nan"],
        ["--host", ""],
    ],
    ids=lambda a: " ".join(a) or "empty",
)
def test_bad_serve_options_are_one_line(args, tmp_path, monkeypatch, capsys) -> None:
    """BUG: ``--port 70000`` is an OverflowError traceback from ``socket.bind`` (--port needs
    an upper bound of 65535); ``--max-upload-mb 0``/``-1`` silently serve with a 1-byte limit
    (``max(1, ...)`` in ``cmd_serve``), ``nan``/``inf`` are ValueError/OverflowError
    tracebacks; ``--batch-wait-ms nan`` starts a server whose inference thread waits forever
    in ``Condition.wait(nan)`` (every request 504), ``--timeout nan`` silently disables the
    timeout (ServeSettings checks ``< 0`` and ``== 0``, which nan passes: use
    ``math.isfinite``); ``--host ''`` listens on every interface and announces
    ``http://:PORT``. Right: each is ``denseseg: error: ...`` on one line, exit 2."""
    code, err = _serve_command(args, tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("denseseg: error: ") and err.count("\n") == 1, err


# ------------------------------------------------------------------ bugs: a real socket
def _start_server(args: list[str], tmp_path) -> tuple[subprocess.Popen, str]:
    from conftest import save_em_checkpoint

    ckpt = save_em_checkpoint(tmp_path / "em.pt", "unet", base_channels=4, depth=2)
    cmd = [sys.executable, "-m", "denseseg", "serve", "--model", str(ckpt), "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line.startswith("denseseg: serving em at http://127.0.0.1:"), line
    return proc, line.split(" at ")[1].strip()


def _status(url: str, path: str = "/v1/segment", body: bytes | None = None) -> int | str:
    method = "GET" if body is None else "POST"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url + path, data=body, method=method), timeout=30
        ) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:
        return repr(exc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``denseseg serve`` with a small queue and a 2 s timeout."""
    import signal

    proc, url = _start_server(
        ["--max-queue", "2", "--max-batch", "1", "--timeout", "2"], tmp_path_factory.mktemp("s")
    )
    deadline = time.monotonic() + 60
    while _status(url, "/healthz") != 200:
        assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
        time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def test_a_burst_against_a_small_queue_is_200_or_503_only(server) -> None:
    """Works: 30 parallel uploads against ``--max-queue 2`` on a real socket: only 200s and
    503s (no hang, no 500), and the server answers afterwards."""
    body = _encode(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: _status(server, body=body), range(30)))
    assert set(answers) <= {200, 503} and 200 in answers and 503 in answers, answers
    assert _status(server, body=body) == 200


def test_a_slow_upload_does_not_hold_its_queue_slot_forever(server) -> None:
    """BUG (slow loris): a request is admitted before its body is read and ``timeout_s`` only
    covers the model, so two clients that send headers and 10 bytes of a 100 kB body, then
    wait, make every other upload 503 for as long as they like (16 connections with the
    default --max-queue). Right: reading the body counts in ``timeout_s``; after it the slow
    request gets 408/504 and its slot is free."""
    host, port = server.removeprefix("http://").split(":")
    head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789"
    slow = [socket.create_connection((host, int(port))) for _ in range(2)]
    try:
        for s in slow:
            s.sendall(head)
        time.sleep(3.5)  # well past --timeout 2
        body = _encode(np.zeros((8, 8), np.uint8))
        assert _status(server, body=body) == 200
    finally:
        for s in slow:
            s.close()
        time.sleep(0.3)


# ------------------------------------------------------------------ hostile cases that work
def test_path_and_header_tricks_never_reach_the_api_without_the_token() -> None:
    """Works: path variants either need the token (401), do not exist (404) or only redirect
    (307, no data); only ``Bearer <token>`` (any case, padded) is accepted."""
    with _client(ServeSettings(token=TOKEN)) as c:
        for path in ("/v1/models/", "//v1/models", "/V1/models", "/v1//models", "/METRICS"):
            r = c.get(path, follow_redirects=False)
            assert r.status_code in (401, 404), (path, r.status_code)
            assert "palette" not in r.text
        assert c.get("/metrics/", follow_redirects=False).status_code in (307, 401, 404)
        for header in ("Basic s3cret", "s3cret", "Bearer", "Bearer s3cre", "Bearer\ts3cret"):
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 401
        for header in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret "):
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 200


def test_near_miss_origins_are_refused() -> None:
    """Works: ``null``, a trailing slash, another port or scheme of an allowed origin or of the
    server itself are all cross-origin (403)."""
    near = (
        "null",
        ALLOWED + "/",
        ALLOWED + ":8443",
        ALLOWED.replace("https", "http"),
        "http://testserver:81",
    )
    with _client(ServeSettings(cors_origins=(ALLOWED,))) as c:
        for origin in near:
            _error(c.get("/v1/models", headers={"Origin": origin}), 403, "cross_origin")


_FILE_HEAD = b'Content-Disposition: form-data; name="file"; filename="a.png"'


def _multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"XyZ") -> bytes:
    out = b"".join(b"--" + boundary + b"\r\n" + h + b"\r\n\r\n" + b + b"\r\n" for h, b in parts)
    return out + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("multipart/form-data", _multipart([(_FILE_HEAD, b"x")])),
        ("multipart/form-data; boundary=OTHER", _multipart([(_FILE_HEAD, b"x")])),
        ("multipart/form-data; boundary=XyZ", b"not multipart at all"),
        (
            "multipart/form-data; boundary=XyZ",
            _multipart([(b'Content-Disposition: form-data; name="x"', b"1")] * 5000),
        ),
        (
            "multipart/form-data; boundary=XyZ",
            _multipart([(_FILE_HEAD + b"\r\nX-Junk: " + b"j" * 2_000_000, b"x")]),
        ),
        (
            "multipart/form-data; boundary=XyZ",
            _multipart([(b'Content-Disposition: form-data; name="file"', b"\x89PNG" * 300_000)]),
        ),
    ],
    ids=[
        "no_boundary",
        "wrong_boundary",
        "garbage",
        "5000_parts",
        "2MB_part_header",
        "big_part_no_filename",
    ],
)
def test_malformed_multipart_is_a_400(client, ctype: str, body: bytes) -> None:
    """Works: broken multipart bodies are a JSON 400, fast, and the server stays healthy."""
    r = client.post("/v1/segment", content=body, headers={"Content-Type": ctype})
    _error(r, 400)
    assert client.post("/v1/segment", content=_encode(_image())).status_code == 200


def _exif_rotated_jpeg() -> bytes:
    image = Image.fromarray(_image(20, 50))
    exif = image.getexif()
    exif[0x0112] = 6  # stored 50x20, displayed 20 wide and 50 high
    return _encode(image, "JPEG", exif=exif.tobytes())


def test_exif_rotation_gives_the_displayed_size_in_every_format(client) -> None:
    """Works: label, overlay and JSON of an EXIF-rotated JPEG have the displayed size."""
    data = _exif_rotated_jpeg()
    for fmt in ("label", "overlay"):
        r = client.post(f"/v1/segment?format={fmt}", content=data)
        assert Image.open(io.BytesIO(r.content)).size == (20, 50)
    body = client.post("/v1/segment?format=json", content=data).json()
    assert (body["width"], body["height"]) == (20, 50)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_image(20, 30, s)).convert("P") for s in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _tiff_16bit_big_endian() -> bytes:
    values = np.random.default_rng(0).integers(0, 65535, (20, 30)).astype(">u2")
    return _encode(
        Image.frombuffer("I;16B", (30, 20), values.tobytes(), "raw", "I;16B", 0, 1), "TIFF"
    )


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (lambda: _encode(_image(1, 1)), (1, 1)),
        (lambda: _encode(_image(1, 300)), (300, 1)),
        (lambda: _encode(_image(300, 1)), (1, 300)),
        (lambda: _encode(_image(1, 65535)), (65535, 1)),
        (_animated_gif, (30, 20)),
        (lambda: _png_with(w=30, h=20, bits=16), (30, 20)),
        (lambda: _encode(Image.fromarray(_image()[..., 0]).convert("LA")), (56, 40)),
        (_tiff_16bit_big_endian, (30, 20)),
    ],
    ids=["1x1", "1x300", "300x1", "1x65535", "animated_gif", "rgb16_png", "LA", "I;16B_tiff"],
)
def test_odd_images_get_a_label_png_of_their_size(client, make, size) -> None:
    """Works: degenerate sizes and unusual modes are segmented, the label PNG of their size."""
    r = client.post("/v1/segment?tta=d4", content=make())
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == size


def test_size_bombs_in_other_formats_are_413(client) -> None:
    """Works: a GIF whose one frame claims 20000x20000 and a float TIFF are refused cleanly."""
    gif = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0x80, 0, 0) + bytes(3) + b"\xff" * 3
    gif += b"\x2c" + struct.pack("<HHHHB", 0, 0, 20000, 20000, 0) + b"\x02\x02\x4c\x01\x00\x3b"
    _error(client.post("/v1/segment", content=gif), 413, "too_many_pixels")
    floats = Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32))
    _error(client.post("/v1/segment", content=_encode(floats, "TIFF")), 400, "bad_image")


def test_a_grayscale_model_takes_colour_images_and_the_reverse() -> None:
    """Works: channel counts are converted both ways, in every format and in a mixed batch."""
    rgb, gray = _encode(_image()), _encode(_image()[..., 0])
    for channels in (1, 3):
        with _client(in_channels=channels) as c:
            for fmt in ("label", "overlay", "json"):
                for data in (rgb, gray):
                    assert c.post(f"/v1/segment?format={fmt}", content=data).status_code == 200
            files = [("files", ("a.png", rgb)), ("files", ("b.png", gray))]
            assert c.post("/v1/segment/batch", files=files).status_code == 200


def test_empty_and_non_finite_options_are_refused(client) -> None:
    """Works: empty, NaN and infinite option values are 400s; an empty mode/tta is the
    default."""
    data = _encode(_image(8, 8))
    for query in ("format=", "alpha=", "alpha=nan", "alpha=inf", "format=json%00"):
        _error(client.post(f"/v1/segment?{query}", content=data), 400, "invalid_option")
    for query in ("mode=", "tta=", "&&&"):
        assert client.post(f"/v1/segment?{query}", content=data).status_code == 200
