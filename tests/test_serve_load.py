"""``benchmarks/serve_load.py`` (issue 15's load test) at a tiny scale: its pieces against a stub
HTTP server, and a whole run against ``denseseg serve`` with a tiny model."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("serve_load", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sl = _load_benchmark()
SIZE = (24, 32)


def _palette_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(size, np.uint8), "P").save(buffer, format="PNG")
    return buffer.getvalue()


class _Stub(BaseHTTPRequestHandler):
    """Answers every 5th request with 503, the others with a palette PNG of :data:`SIZE`."""

    protocol_version = "HTTP/1.1"
    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).count += 1
            busy = self.count % 5 == 0
        good = b'name="file"' in body and self.headers["Authorization"] == "Bearer t"
        data = b'{"error": {}}' if busy or not good else _palette_png(SIZE)
        self.send_response(503 if busy else 200 if good else 400)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_url() -> Iterator[str]:
    _Stub.count = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_load_counts_answers_and_errors_by_kind(stub_url: str) -> None:
    pngs = [sl.synthetic_png(SIZE, i) for i in range(2)]
    assert sl.png_size(pngs[0]) == (*SIZE, 2)  # RGB
    target = sl.make_target(stub_url, pngs, SIZE, "t", timeout=10)
    result = sl.run_load(target, clients=2, requests=20, max_seconds=30)
    assert (result.sent, result.ok, dict(result.errors)) == (20, 16, {"HTTP 503": 4})
    assert len(result.latencies) == 16 and result.seconds > 0
    wrong_size = sl.make_target(stub_url, pngs, (5, 5), "t", timeout=10)
    assert "wrong PNG size" in sl.run_load(wrong_size, 1, 3, 30).errors
    refused = sl.make_target("http://127.0.0.1:1", pngs, SIZE, None, timeout=5)
    errors = sl.run_load(refused, 2, 4, 30).errors
    assert sum(errors.values()) == 4 and "ConnectionRefusedError" in errors


def test_report_and_options() -> None:
    row = {"max_batch": 2, "clients": 2, "requests": 10, "ok": 10, "errors": {}}
    row |= {"warmup_errors": {}, "throughput": 8.0, "p50_ms": 200.0, "p99_ms": 300.0}
    row |= {"rss_before": 100 * sl.MB, "rss_after": 104 * sl.MB, "growth": 0.04}
    row |= {"growth_second_half": 0.01}
    sl.add_verdicts([row], {"images_per_s": 10.0})
    assert (row["meets_errors"], row["meets_growth"], row["meets_ratio"]) == (True, True, True)
    table = sl.markdown_table([row], {"images_per_s": 10.0})
    assert "| 2 | 2 | 10 | 0 | 8.00 | 200 | 300 | 10.00 | 0.80 | 100 | 104 | +4.0 % |" in table
    lines = sl.target_lines([row], asked=20)
    assert lines[0] == "max batch 2: errors 0 (only 10 of 20 sent in time): met"
    assert "+4.0 %, +1.0 % in the run's second half (target < 5 %): met" in lines[1]
    for bad in (["--url", "http://192.0.2.1:8000"], ["--clients", "65"], ["--pid", "1"]):
        with pytest.raises(SystemExit):
            sl.parse_args(bad)
    assert sl.parse_args(["--url", "http://localhost:8000/"]).url
    assert sl.rss_bytes(2**22 + 12345) is None


def _tiny_checkpoint(path: Path) -> Path:
    """An untrained tiny 3-class RGB U-Net checkpoint, as ``denseseg train`` writes one."""
    from denseseg.checkpoint import atomic_save
    from denseseg.models import create_model

    kwargs = {"num_classes": 3, "in_channels": 3, "base_channels": 4, "depth": 2}
    ckpt = {
        "model": create_model("unet", **kwargs).state_dict(),
        "model_name": "unet",
        "model_kwargs": kwargs,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "class_names": ["a", "b", "c"],
        "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
        "step": 1,
    }
    atomic_save(ckpt, path)
    return path


@pytest.mark.slow
@pytest.mark.heavy  # minutes: make test-all
def test_whole_run_against_denseseg_serve(tmp_path: Path, capsys) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    ckpt = _tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "load.json"
    args = ["--model", str(ckpt), "--clients", "2", "--requests", "10", "--warmup", "2"]
    args += ["--size", *map(str, SIZE), "--images", "2", "--reference-images", "4"]
    args += ["--threads", "1", "--max-batch", "1", "2", "--settle", "0.2", "--json", str(out)]
    sl.main(args)
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["max_batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert (row["requests"], row["ok"], row["errors"]) == (10, 10, {})
        assert row["rss_before"] > 0 and row["rss_after"] > 0 and row["p99_ms"] > 0
    assert result["reference"]["images_per_s"] > 0
    assert printed.count("\n| ") == 3 and "max batch 2: errors 0: met" in printed
